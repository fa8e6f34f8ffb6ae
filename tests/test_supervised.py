"""The reward-model stage's data: disjoint halves, word windows, batches grouped by kind."""

from nanowarp.supervised import batches, grouped_batches, split_half, word_windows


def test_halves_are_disjoint_cover_everything_and_hold_both_labels():
    texts = [f"review {i}" for i in range(10)]
    labels = [0] * 5 + [1] * 5  # sorted by label, as load_reviews returns them
    a, b = split_half(texts, labels, "a"), split_half(texts, labels, "b")
    assert set(a[0]).isdisjoint(b[0]) and sorted(a[0] + b[0]) == sorted(texts)
    assert set(a[1]) == set(b[1]) == {0, 1}
    assert split_half(texts, labels, "all") == (texts, labels)


def test_word_windows_are_consecutive_words_of_their_text_in_length_range():
    texts = [" ".join(f"w{i}_{k}" for k in range(100)) for i in range(20)] + ["only three words"]
    labels = [i % 2 for i in range(21)]
    windows, window_labels = word_windows(texts, labels, 3, 5, 60, seed=0)
    assert len(windows) == 3 * len(texts)
    for j, window in enumerate(windows):
        text, label = texts[j // 3], labels[j // 3]
        assert window_labels[j] == label
        words = window.split()
        assert f" {window} " in f" {text} "  # consecutive words of the text
        assert 5 <= len(words) <= 60 or words == text.split()  # a text shorter than 5 words: whole
    assert len({len(w.split()) for w in windows[:60]}) > 5  # lengths are drawn
    assert word_windows(texts, labels, 3, 5, 60, seed=0) == (windows, window_labels)  # seeded


def test_grouped_batches_keep_groups_apart_and_cover_every_example():
    steps = grouped_batches([10, 25], batch_size=4, epochs=2, seed=0)
    seen = sorted(i for b in steps for i in b)
    assert seen == sorted(list(range(35)) * 2)
    assert all(max(b) < 10 or min(b) >= 10 for b in steps)  # one group per batch
    kinds = [b[0] < 10 for b in steps]
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)  # the groups are interleaved
    assert grouped_batches([10], 4, 2, seed=3) == batches(10, 4, 2, 3)  # one group: as before
