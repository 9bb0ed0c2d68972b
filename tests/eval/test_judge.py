"""The committed judge must read fresh ground truth (seeds never used in its training)
almost perfectly; otherwise ShapeEval would measure the judge, not the DiT."""

from clq_compile.eval import accuracy, generate, load_judge


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
