"""
Merge GPT-2 checkpoints the WARP way, offline: SLERP (or LERP) of the policies' task vectors
against --init, then LITI towards a base:

    θ_merge = SLERP(θ_init, {θ_m})                   per tensor; M > 2 recursively, λ = 1/M
    θ_out   = (1 − η) · θ_base + η · θ_merge           θ_base = --liti_base, or --init

One η writes a checkpoint to --out; several write --out/eta_{E}/ for each E as typed, e.g.
`--eta 0 0.5 1` gives eta_0/, eta_0.5/, eta_1/ (a LITI sweep, ready for eval.py). Every output is
a complete checkpoint: config.json, model.safetensors, the tokenizer files of --init, a
model card (README.md) and checksums.sha256. An input folder with a checksums.sha256 is verified first.
Everything is checked before anything is written: a mismatched checkpoint or a bad η writes nothing.
Each output is written to a temporary folder beside it and moved in only once complete, so --out is
never half-written: a failed merge (a full disk, a kill) leaves what was there before.

    python merge.py --init lvwerra/gpt2-imdb --policies runs/a runs/b --out runs/merged --eta 0.3 0.5 1
"""

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass

from nanowarp import checksums, hub, merging
from nanowarp.card import model_card
from nanowarp.config import fail, flag, parse_args as parse_flags
from nanowarp.models import from_pretrained, save_policy


@dataclass
class Args:
    init: str = flag(None, "θ_init: the checkpoint the policies were trained from (task vectors are θ_m − θ_init)",
                     required=True, metavar="DIR")
    policies: tuple = flag(None, "θ_1 .. θ_M: the fine-tuned checkpoints to merge", required=True, nargs="+",
                           metavar="DIR")
    out: str = flag(None, "output folder (with several --eta, one subfolder eta_{E} per value)", required=True,
                    metavar="DIR")
    method: str = flag("slerp", "merge of the task vectors: slerp (WARP) or lerp (plain averaging)",
                       choices=["slerp", "lerp"])
    eta: tuple = flag(("1",), "LITI rate(s) η in [0, 1]: (1 − η)·base + η·merge; 1 = the merge itself",
                      nargs="+", metavar="E")
    liti_base: str = flag(None, "base of the LITI step, e.g. the SFT model for a Pareto front; None: --init",
                          metavar="DIR")


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__)


def parse_etas(etas):
    """{folder name: η} for the η strings as typed; refuses anything outside [0, 1]."""
    out = {}
    for e in etas:
        try:
            value = float(e)
        except ValueError:
            fail("merge.py", f"--eta {e!r} is not a number; give values in [0, 1]")
        if not 0 <= value <= 1:  # also refuses nan
            fail("merge.py", f"--eta {e} is outside [0, 1] (0 keeps the base, 1 gives the merge)")
        if f"eta_{e}" in out:
            fail("merge.py", f"--eta {e} is given twice")
        out[f"eta_{e}"] = value
    return out


def load(name, role):
    """(HF-layout state dict, model config, local folder) of a checkpoint of any architecture, or a clear error."""
    try:
        folder = hub.resolve(name)
        model = from_pretrained(folder)
    except hub.CheckpointError as e:
        fail("merge.py", f"{role} {name}: {e}")
    return model.hf_state_dict(), model.config, folder


def write_checkpoint(folder, theta, config, tokenizer_folder, card=None):
    """save_policy into a temporary folder beside `folder`, then move it in by renames, which need
    no space; into an existing folder, file by file, its config.json (which marks a checkpoint
    complete) and checksums.sha256 removed first and written last. Files of `folder` that merge.py does
    not write stay."""
    folder = os.path.abspath(folder)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=".tmp-", suffix="-" + os.path.basename(folder))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the checkpoint private
        save_policy(tmp, theta, config, tokenizer_folder, card)
        if not os.path.exists(folder):
            os.rename(tmp, folder)
            return
        for name in (checksums.NAME, "config.json"):
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        for name in sorted(os.listdir(tmp), key=lambda name: (name == checksums.NAME, name == "config.json")):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))  # config.json, then checksums, last
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    args = parse_args(argv)
    etas = parse_etas(args.eta)

    # 1. read and check every input before writing anything
    checkpoints = [("--init " + args.init, *load(args.init, "--init"))]
    checkpoints += [("--policies " + p, *load(p, "--policies")) for p in args.policies]
    if args.liti_base is not None:
        checkpoints.append(("--liti_base " + args.liti_base, *load(args.liti_base, "--liti_base")))
    names, thetas, configs, folders = zip(*checkpoints)
    try:
        merging.check_compatible(list(thetas), list(names), list(configs))
    except ValueError as e:
        fail("merge.py", str(e))
    init, init_config, init_folder = thetas[0], configs[0], folders[0]
    policies = list(thetas[1:1 + len(args.policies)])
    base = thetas[-1] if args.liti_base is not None else init
    outputs = {os.path.join(args.out, name): eta for name, eta in etas.items()} if len(etas) > 1 \
        else {args.out: next(iter(etas.values()))}
    for folder in outputs:
        if os.path.realpath(folder) in {os.path.realpath(f) for f in folders}:
            fail("merge.py", f"output {folder} is one of the input checkpoints: choose another --out")

    # 2. θ_merge = SLERP(θ_init, {θ_m}), per tensor (or LERP: θ_init + mean_m δ_m)
    merge = merging.slerp if args.method == "slerp" else merging.lerp
    merged = merge(init, policies)
    geometry = merging.task_vector_stats(init, policies, merged)
    cos, ratio = geometry["cos_per_tensor_mean"], geometry["merge_norm_ratio"]
    print(f"merged {len(policies)} policies with {args.method} around {args.init}"
          + (f" | mean cos Ω between task vectors {cos:.4f}" if cos is not None else "")
          + (f" | ‖δ_merge‖ / mean ‖δ_m‖ = {ratio:.4f}" if ratio is not None else ""))

    # 3. θ_out = (1 − η) θ_base + η θ_merge, for each η (LITI)
    base_name = args.liti_base if args.liti_base is not None else args.init
    stats = {k: v for k, v in dict(mean_cos_task_vectors=cos, merge_norm_ratio=ratio).items() if v is not None}
    done = []
    for folder, eta in outputs.items():
        card = model_card(f"nanowarp merge: {folder}", f"(1 − η)·{base_name} + η·{args.method.upper()}({args.init}; "
                          f"{', '.join(args.policies)}) with η = {eta:g}: the task vectors of the policies against "
                          f"--init merged per tensor, then interpolated towards the base (LITI).", args.init,
                          {**dataclasses.asdict(args), "eta": eta}, stats)
        try:
            write_checkpoint(folder, merging.liti(base, merged, eta), init_config, init_folder, card)
        except hub.DiskFullError as e:
            fail("merge.py", f"{e}" + (f" (the outputs written before, {', '.join(done)}, are complete)" if done else ""))
        print(f"wrote {folder}: (1 - {eta:g}) * {base_name} + {eta:g} * {args.method}")
        done.append(folder)


if __name__ == "__main__":
    main()
