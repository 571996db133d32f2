"""The shapes world: captions and their parser, deterministic drawing, the held-out split, and the exact reward's
ground-truth confusion table (every image scores >= 0.95 on its own caption and less on each kind of wrong one)."""
import dataclasses

import numpy as np
import pytest
import torch

import cli
import rewards
import shapes


def test_grammar_round_trips_and_rejects_other_text():
    specs = shapes.all_specs()
    assert len({shapes.caption(s) for s in specs}) == len(specs) == 12 + 36 + 132 + 528
    for s in specs:
        assert shapes.parse(shapes.caption(s)) == s
    assert shapes.parse("  Three RED squares. ") == shapes.Spec("count", ((3, "red", "square"),))
    for bad in ("a purple circle", "five red squares", "a cat", "two red circles and a blue square"):
        with pytest.raises(ValueError, match="shapes"):
            shapes.parse(bad)


def test_drawing_is_deterministic_per_index():
    a, b = shapes.dataset_item(17), shapes.dataset_item(17)
    assert a[1] == b[1] and np.array_equal(a[0], b[0])
    assert a[0].shape == (shapes.SIZE, shapes.SIZE, 3) and a[0].dtype == np.uint8
    assert not np.array_equal(shapes.dataset_item(18)[0], a[0])
    assert np.array_equal(shapes.render("a red circle", 5), shapes.render("a red circle", 5))
    assert not np.array_equal(shapes.render("a red circle", 5), shapes.render("a red circle", 6))
    cats = {shapes.parse(shapes.dataset_item(i)[1]).category for i in range(200)}
    assert cats == set(shapes.CATEGORIES)   # every category is drawn


def test_held_out_combinations_never_reach_training():
    train_split, held = set(shapes.split("train")), set(shapes.split("heldout"))
    assert train_split.isdisjoint(held) and len(train_split) + len(held) == len(shapes.all_specs())
    assert 0.1 < len(held) / (len(held) + len(train_split)) < 0.4   # a few combinations, not most
    for text in train_split:
        for n, c, s in shapes.parse(text).objects:
            assert (c, s) not in shapes.HELD_OUT["colour_shape"] and (n, s) not in shapes.HELD_OUT["count_shape"]
    assert all(shapes.dataset_item(i)[1] in train_split for i in range(300))
    sets = shapes.prompt_sets()
    assert set(sets["shapes"]) | set(sets["shapes-hard"]) <= train_split and set(sets["shapes-heldout"]) <= held
    for name, prompts in sets.items():   # the shipped prompt files are what the code generates
        assert (shapes.PROMPT_DIR / f"{name}.txt").read_text().split("\n")[:-1] == prompts
        assert cli.load_prompts(name) == prompts


def _wrong(spec: shapes.Spec) -> dict[str, str]:
    """Captions that differ from spec in one way each, keyed by the kind of error."""
    (n, c, s), *rest = spec.objects
    other_c = next(x for x in shapes.COLOURS if x != c and all(x != o[1] for o in rest))
    other_s = next(x for x in shapes.SHAPES if x != s and all(x != o[2] for o in rest))
    out = {"colour": dataclasses.replace(spec, objects=((n, other_c, s), *rest)),
           "shape": dataclasses.replace(spec, objects=((n, c, other_s), *rest))}
    if spec.category in ("single", "count"):
        out["count"] = dataclasses.replace(spec, category="count" if n < 4 else "count",
                                           objects=((n + 1 if n < 4 else n - 1, c, s),))
    if spec.category == "relation":
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        out["relation"] = dataclasses.replace(spec, relation=opposite[spec.relation])
    if spec.category in ("two", "relation"):
        (_, c2, s2) = rest[0]
        if c != c2 and s != s2:   # attribute binding: the colours swapped between the objects
            out["binding"] = dataclasses.replace(spec, objects=((1, c2, s), (1, c, s2)))
    return {k: shapes.caption(v) for k, v in out.items()}


def test_reward_confusion_table_on_ground_truth():
    rows = {}   # (category, error kind) -> scores
    for i in range(240):
        image, text = shapes.dataset_item(i, "all")
        spec = shapes.parse(text)
        own = shapes.score(image, text)
        rows.setdefault((spec.category, "own"), []).append(own["reward"])
        for kind, wrong in _wrong(spec).items():
            rows.setdefault((spec.category, kind), []).append(shapes.score(image, wrong)["reward"])
    table = {k: (min(v), float(np.mean(v)), max(v)) for k, v in sorted(rows.items())}
    print("\ncategory   caption   min   mean   max")
    for (cat, kind), (lo, mean, hi) in table.items():
        print(f"{cat:<10} {kind:<9} {lo:.3f} {mean:.3f} {hi:.3f}")
    for cat in shapes.CATEGORIES:
        assert table[(cat, "own")][0] >= 0.95, f"{cat}: a ground-truth image scored below 0.95 on its caption"
        kinds = [k for c, k in table if c == cat and k != "own"]
        assert len(kinds) >= 2
        for kind in kinds:
            assert table[(cat, kind)][2] < table[(cat, "own")][0], f"{cat}/{kind}: a wrong caption scored as high"
            assert table[(cat, kind)][1] <= 0.8, f"{cat}/{kind}: wrong captions score {table[(cat, kind)][1]:.2f}"


def test_reward_partial_credit_and_atoms():
    image = shapes.render("a red circle left of a blue square", 0)
    s = shapes.score(image, "a red circle left of a blue square")
    assert s == {"object": 1.0, "count": s["count"], "relation": 1.0, "clean": 1.0, "reward": 1.0}
    assert np.isnan(s["count"])
    wrong = shapes.score(image, "a red circle right of a blue square")
    assert wrong["relation"] == 0.0 and wrong["object"] == 1.0 and wrong["reward"] == pytest.approx(3 / 4)   # objects 1, 1; relation 0; clean 1
    blank = np.full((32, 32, 3), shapes.BACKGROUND, np.uint8)
    assert shapes.score(blank, "three red squares")["reward"] == 0.0
    three = shapes.render("three red squares", 1)
    assert shapes.score(three, "three red squares")["count"] == 1.0
    assert shapes.score(three, "two red squares")["count"] == pytest.approx(0.25)
    assert shapes.score(three, "four red squares")["count"] == pytest.approx(0.375)


def test_registered_reward_reports_categories_and_rejects_foreign_prompts():
    items = [shapes.dataset_item(i) for i in range(12)]
    images = torch.tensor(np.stack([im for im, _ in items])).permute(0, 3, 1, 2).float() / 255
    prompts = [t for _, t in items]
    reward = rewards.build_reward("shapes")
    scores, info = reward(images, prompts)
    assert scores.shape == (12,) and scores.min() >= 0.95
    cats = info["details"]["shapes"]["categories"]
    for i, p in enumerate(prompts):
        category = shapes.parse(p).category
        assert cats[category][i] == scores[i]
        assert all(torch.isnan(cats[c][i]) for c in shapes.CATEGORIES if c != category)
    with pytest.raises(ValueError, match="shapes-world captions only.*'a photo of a cat'"):
        reward(images[:1], ["a photo of a cat"])
