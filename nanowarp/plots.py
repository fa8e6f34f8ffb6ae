"""
KL–reward plots, the WARP paper's figures: KL to the reference policy (x) against the reward (y),
or against any other column of evaluation rows (the judge's P(positive), the held-out NLL).

`kl_reward_plane` draws one such plane on a matplotlib axis, for eval.py's plot (`plot`) and for
reproduce.py's figure (nanowarp/study/report.py). The rows are evaluation rows as eval.py writes them:
`model`, `kl`, `reward` and the other columns; a LITI sweep's points also `sweep` (the sweep's name)
and `eta`. matplotlib is optional (pip install matplotlib): the callers import it.
"""


def sweep_rows(rows, sweep):
    """The rows of LITI sweep `sweep`, in order of eta."""
    return sorted((r for r in rows if r.get("sweep") == sweep), key=lambda r: r["eta"])


def best_of_models(rows):
    """The models of the best-of-N rows (eval.py --best_of), in order of N: a line, the reference front."""
    return [r["model"] for r in sorted((r for r in rows if r.get("best_of") is not None), key=lambda r: r["best_of"])]


def kl_reward_plane(ax, rows, y="reward", draw=None):
    """Draw KL (x) against column `y` of `rows` on the matplotlib axis `ax`; returns the lines.

    draw: what to draw, in this order, as (what, fmt, style) triples: `what` is the name of a LITI
    sweep (a line through its points in order of eta) or a list of models (a line through them in
    this order; one model: a point); `fmt` a matplotlib format string ("o", ".-", "ko-"); `style`
    ax.plot's keyword arguments (label, color, lw, ...), plus optionally `notes`: one text per point
    (None: none) written next to it, with `note_offset` (points; default (4, 4)) and `note_size`
    (default 7); for a sweep, notes="eta" writes η at both ends in the line's colour.
    None: eval.py's plot, every model that is neither a sweep point nor best-of-N as a point named
    after it, every sweep as a line named after it, with η at its ends, and best-of-N as a dashed
    grey line with N at its points."""
    if draw is None:
        points = [([r["model"]], "o", dict(notes=[r["model"]])) for r in rows
                  if r.get("sweep") is None and r.get("best_of") is None]
        sweeps = dict.fromkeys(r["sweep"] for r in rows if r.get("sweep") is not None)
        draw = points + [(name, ".-", dict(label=name, notes="eta", note_offset=(4, -10))) for name in sweeps]
        bon = best_of_models(rows)
        if bon:
            by_model = {r["model"]: r for r in rows}
            draw.append((bon, "s--", dict(color="grey", ms=3, label="best-of-N of the reference",
                                          notes=[f"N={by_model[m]['best_of']}" for m in bon])))
    by_model = {r["model"]: r for r in rows}
    lines = []
    for what, fmt, style in draw:
        style = dict(style)
        notes, offset, size = style.pop("notes", None), style.pop("note_offset", (4, 4)), style.pop("note_size", 7)
        points = sweep_rows(rows, what) if isinstance(what, str) else [by_model[m] for m in what if m in by_model]
        points = [r for r in points if y in r]  # e.g. best-of-N has no held-out NLL
        if not points:
            continue
        line, = ax.plot([r["kl"] for r in points], [r[y] for r in points], fmt, **style)
        lines.append(line)
        if notes == "eta":  # mark the ends of the sweep with their η, in its colour
            notes = [(r, f"η={r['eta']:g}", line.get_color()) for r in (points[0], points[-1])]
        else:
            notes = [(r, text, None) for r, text in zip(points, notes or ()) if text is not None]
        for r, text, color in notes:
            ax.annotate(text, (r["kl"], r[y]), textcoords="offset points", xytext=offset, fontsize=size,
                        **({"color": color} if color else {}))
    return lines


def plot(results, path, log=print):
    """eval.py's plot: KL (x) against reward (y), one labelled point per model, one line per LITI
    sweep (rows with `sweep` and `eta`). Writes a PNG to path and returns True, or returns False with
    a note when matplotlib is not installed (it is optional: pip install matplotlib)."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    kl_reward_plane(ax, results)
    if any(r.get("sweep") is not None or r.get("best_of") is not None for r in results):
        ax.legend(fontsize=7)
    ax.set_xlabel("KL(π ‖ π_ref)")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=150)
    return True
