"""The committed judge must read fresh ground truth (seeds never used in its training)
almost perfectly; otherwise ShapeEval would measure the judge, not the DiT."""

import torch

from clq_compile.eval import accuracy, generate, load_judge
from clq_compile.eval.judge import ATTRIBUTES


def test_judge_accuracy_on_fresh_images():
    judge = load_judge()
    images, labels = generate(256, seed=424_242)
    acc = accuracy(judge.predict(images), labels)
    assert acc["joint"] >= 0.98, acc


def test_judge_rejects_wrong_labels():
    # Shifting every label by one must make the judge disagree almost everywhere.
    judge = load_judge()
    images, labels = generate(64, seed=5)
    pred = judge.predict(images)
    wrong = labels.clone()
    wrong[:, 1] = (wrong[:, 1] + 1) % 6
    assert accuracy(pred, wrong)["joint"] <= 0.05


def test_margins_are_the_gap_between_the_two_likeliest_classes():
    """Computed from the raw logits here; a blurred image must sit nearer a tie than the
    clean one on average (the margin reads confidence, not just any number)."""
    judge = load_judge()
    images, _ = generate(32, seed=7)
    margins = judge.margins(images)
    with torch.no_grad():
        logits = judge(images)
    for j, a in enumerate(ATTRIBUTES):
        p = logits[a].softmax(-1).sort(-1, descending=True).values
        torch.testing.assert_close(margins[:, j], p[:, 0] - p[:, 1])
    assert ((margins >= 0) & (margins <= 1)).all()
    blurred = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2)
    assert judge.margins(blurred).mean() < margins.mean()
