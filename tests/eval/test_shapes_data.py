"""The procedural shapes dataset: deterministic by seed, captions round-trip, and every
attribute actually changes the pixels (otherwise the judge/ShapeEval would be meaningless)."""

import torch

from clq_compile.eval.shapes_data import (
    COLOUR_NAMES,
    POSITIONS,
    SHAPES,
    VOCAB,
    all_labels,
    caption,
    generate,
    labels_to_tokens,
    parse_caption,
    render,
    tokenize,
)


def test_same_seed_identical_different_seed_differs():
    a_img, a_lab = generate(64, seed=3)
    b_img, b_lab = generate(64, seed=3)
    c_img, c_lab = generate(64, seed=4)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert not torch.equal(a_img, c_img)
    assert a_img.shape == (64, 3, 32, 32) and a_img.dtype == torch.float32
    assert 0.0 <= a_img.min() and a_img.max() <= 1.0


def test_captions_tokens_round_trip():
    labels = all_labels()
    assert len(labels) == len(SHAPES) * len(COLOUR_NAMES) * len(POSITIONS)
    texts = [caption(*row) for row in labels.tolist()]
    assert [parse_caption(t) for t in texts] == [tuple(r) for r in labels.tolist()]
    assert torch.equal(tokenize(texts), labels_to_tokens(labels))
    assert tokenize([None, ""]).eq(VOCAB.id("<null>")).all()
    assert len(set(map(tuple, tokenize(texts).tolist()))) == len(texts)


def _render_one(shape: int, colour: int, position: int) -> torch.Tensor:
    # Same generator seed -> same jitter and background; only the attribute differs.
    return render(torch.tensor([[shape, colour, position]]), torch.Generator().manual_seed(7))[0]


def test_each_attribute_changes_the_image():
    base = _render_one(0, 0, 0)
    for other in (_render_one(1, 0, 0), _render_one(0, 1, 0), _render_one(0, 0, 3)):
        assert (base - other).abs().amax() > 0.3
    # The shape sits in its quadrant: the top-left quadrant differs from the background most.
    img = _render_one(0, 0, 0)  # red circle top-left
    red_excess = img[0] - img[1:].mean(0)
    assert red_excess[:16, :16].mean() > red_excess[16:, 16:].mean() + 0.05
