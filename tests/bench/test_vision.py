"""The ``vision`` suite: data splits, backbone, experts, BatchNorm re-estimation, merging round trip.

Real packaged data and the real EfficientNet-Lite0 weights, tiny budgets. The data cache goes to a temporary
``NEUROMERGE_CACHE``. The end-to-end protocol test (``test_quick_run_end_to_end``) is the slow one (~2 min).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from neuromerge.bench import vision, vision_data
from neuromerge.errors import TaskError
from neuromerge.functional import merge_state_dicts
from neuromerge.tasks.contract import Budget, Expert, Split, TaskData

TINY = Budget(quick=True, train_steps=30, batch_size=32, eval_examples=200, probe_steps=100,
              extra={"bn_reestimate": True, "bn_batches": 2, "bn_batch_size": 64, "train_examples": 600,
                     "probe_examples": 300})


@pytest.fixture(scope="module", autouse=True)
def _data_cache_and_threads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary data cache, and one torch thread: on a loaded 2-core machine two threads make the
    convolutions 3-10× slower (spinning workers)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NEUROMERGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    vision_data._raw_sets.cache_clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    vision_data._raw_sets.cache_clear()
    mp.undo()


@pytest.fixture(scope="module")
def suite() -> vision.VisionSuite:
    return vision.VisionSuite()


@pytest.fixture(scope="module")
def mnist_task() -> TaskData:
    return vision_data.image_task("mnist", sizes=(600, 200, 200))


@pytest.fixture(scope="module")
def mnist_expert(suite: vision.VisionSuite, mnist_task: TaskData) -> Expert:
    return suite.train_expert(mnist_task, TINY, "full", seed=0)


def _no_reestimate(budget: Budget) -> Budget:
    return dataclasses.replace(budget, extra={**budget.extra, "bn_reestimate": False})


# ------------------------------------------------------------------------------------------------------- data


def test_tasks_shapes_sizes_and_stratification(suite: vision.VisionSuite) -> None:
    tasks = {t.name: t for t in suite.tasks(suite.budget(quick=False))}
    assert list(tasks) == ["mnist", "mnist_rot90", "digits", "letters", "faces", "mnist_inverted"]
    assert [t.name for t in tasks.values() if not t.in_domain] == ["faces", "mnist_inverted"]
    for t in tasks.values():
        for split in (t.train, t.val, t.test):
            assert split.inputs.dtype == torch.float32
            assert split.inputs.shape[1:] == (1, 32, 32)
            assert float(split.inputs.min()) >= 0.0 and float(split.inputs.max()) <= 1.0
            assert split.labels.shape == (split.inputs.shape[0],)
    m = tasks["mnist"]
    assert (len(m.train), len(m.val), len(m.test)) == (3000, 200, 1000)
    assert m.train.labels.bincount().tolist() == [300] * 10  # 60 % of 500 per class
    assert m.val.labels.bincount().tolist() == [20] * 10  # capped at 200 (of 1,000), still stratified
    assert m.test.labels.bincount().tolist() == [100] * 10  # the whole test split (20 % of 500 per class)
    quick = {t.name: t for t in suite.tasks(suite.budget(quick=True))}["mnist"]
    assert quick.test.labels.bincount().tolist() == [20] * 10  # --quick: capped at 200, still stratified
    assert tasks["letters"].num_classes == 26 and tasks["faces"].classes == ["non-face", "face"]
    assert tasks["faces"].train.labels.bincount().tolist() == [60, 60]


def test_splits_are_deterministic_and_seed_dependent() -> None:
    a = vision_data.image_task("digits", seed=0)
    b = vision_data.image_task("digits", seed=0)
    c = vision_data.image_task("digits", seed=1)
    assert a.fingerprint == b.fingerprint
    for s, t in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(s.inputs, t.inputs) and torch.equal(s.labels, t.labels)
    assert c.fingerprint != a.fingerprint and not torch.equal(a.train.inputs, c.train.inputs)


def test_splits_are_disjoint_and_cover_the_set() -> None:
    # image i is filled with the value i / n: identify every example by its content
    n, classes = 90, ["a", "b", "c"]
    images = (torch.arange(n, dtype=torch.float32) / n).view(n, 1, 1, 1).expand(n, 1, 32, 32).contiguous()
    labels = torch.tensor([i % 3 for i in range(n)])
    task = vision_data.make_image_splits("toy", vision_data.ImageSet(images, labels, classes, "toy"), seed=3)
    ids = [set(torch.round(s.inputs[:, 0, 0, 0] * n).long().tolist()) for s in (task.train, task.val, task.test)]
    assert [len(i) for i in ids] == [54, 18, 18]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == set(range(n))
    for s in (task.train, task.val, task.test):  # labels follow their images; every prefix is class-balanced
        assert torch.equal(s.labels, torch.round(s.inputs[:, 0, 0, 0] * n).long() % 3)
        assert s.labels[:6].tolist() == [0, 1, 2, 0, 1, 2]


def test_subset_keeps_the_class_mix_of_sorted_or_interleaved_splits() -> None:
    for labels in (torch.tensor([0] * 60 + [1] * 30 + [2] * 30), torch.tensor([0, 0, 1, 2] * 30)):
        images = torch.arange(120, dtype=torch.float32).view(120, 1, 1, 1)
        for n in (12, 20, 40):  # 20 of an interleaved 4-periodic order: a stride-6 pick would miss classes
            sub = vision.subset(Split(images, labels), n)
            assert len(sub) == n and sub.labels.bincount().tolist() == [n // 2, n // 4, n // 4]
            assert torch.equal(labels[sub.inputs.flatten().long()], sub.labels)  # rows stay paired
            assert sub.inputs.flatten().unique().numel() == n
    assert len(vision.subset(Split(images, labels), 500)) == 120


def test_rotated_and_inverted_mnist_share_the_mnist_partition() -> None:
    sizes = (100, 50, 50)
    m, r, inv = (vision_data.image_task(name, sizes=sizes) for name in ("mnist", "mnist_rot90", "mnist_inverted"))
    assert torch.equal(torch.rot90(m.test.inputs, 1, dims=(2, 3)), r.test.inputs)
    assert torch.equal(1.0 - m.train.inputs, inv.train.inputs)
    assert torch.equal(m.val.labels, r.val.labels)


def test_bad_image_tasks_are_rejected() -> None:
    images = torch.zeros(10, 1, 32, 32)
    with pytest.raises(TaskError, match="fewer than 3"):
        vision_data.make_image_splits("x", vision_data.ImageSet(images, torch.tensor([0] * 8 + [1] * 2), ["a", "b"],
                                                                ""))
    with pytest.raises(TaskError, match="outside"):
        vision_data.make_image_splits("x", vision_data.ImageSet(images, torch.tensor([0] * 9 + [5]), ["a", "b"], ""))


def test_to_model_images_accepts_common_layouts() -> None:
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (4, 28, 28), generator=g, dtype=torch.uint8)
    x = vision_data.to_model_images(u8)
    assert x.shape == (4, 1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    rgb_last = np.random.default_rng(0).random((2, 40, 40, 3)).astype(np.float32)
    y = vision_data.to_model_images(rgb_last)
    assert y.shape == (2, 3, 32, 32)
    # a constant image stays constant through the resize
    assert torch.allclose(vision_data.to_model_images(torch.full((1, 8, 8), 0.25)), torch.full((1, 1, 32, 32), 0.25))
    with pytest.raises(ValueError, match="expected images"):
        vision_data.to_model_images(torch.zeros(2, 5, 8, 8))


# --------------------------------------------------------------------------------------------------- backbone


def test_backbone_state_has_no_classifier_and_excludes_bn_buffers(suite: vision.VisionSuite) -> None:
    sd = suite.backbone_state()
    assert not any(k.startswith("_fc") for k in sd)
    assert sum(v.numel() for k, v in sd.items() if v.is_floating_point() and "running" not in k) == 3_371_008
    excluded = {k for k in sd if any(re.search(p, k) for p in suite.merge_exclude())}
    assert excluded == {k for k in sd if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert len(excluded) == 3 * sum(1 for k in sd if k.endswith("running_mean")) > 0
    net = vision.build_backbone()
    assert all(m.momentum == 0.1 for _, m in vision._bn_layers(net))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 1280)
    assert suite.model_type() is None
    json.dumps(suite.fingerprint())
    fp = suite.fingerprint()
    assert fp["image_size"] == 32 and fp["bn_momentum"] == 0.1 and fp["packages"]["torch"] == torch.__version__


def test_reestimate_bn_matches_direct_batch_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 1, 32, 32, generator=g)
    net = vision.build_backbone().eval()
    before = net._bn0.running_mean.clone()
    vision.reestimate_bn(net, images, batch_size=8)
    # direct computation: the stem conv's output per batch, per channel
    with torch.no_grad():
        stem = vision.build_backbone()._conv_stem
        acts = [stem(vision.preprocess(images[i:i + 8])) for i in range(0, 24, 8)]
    flat = [a.permute(1, 0, 2, 3).reshape(a.shape[1], -1).double().numpy() for a in acts]
    mean = np.mean([f.mean(axis=1) for f in flat], axis=0)  # equal batches: the overall mean
    var = np.mean([f.var(axis=1, ddof=1) for f in flat], axis=0)  # mean of the unbiased per-batch variances
    np.testing.assert_allclose(net._bn0.running_mean.double().numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net._bn0.running_var.double().numpy(), var, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, net._bn0.running_mean)
    assert int(net._bn0.num_batches_tracked) == 3
    assert net._bn0.momentum == 0.1  # momentum and mode restored
    assert not any(m.training for m in net.modules())


# ---------------------------------------------------------------------------------------------------- experts


def test_full_expert_beats_chance_on_mnist(suite: vision.VisionSuite, mnist_expert: Expert,
                                           mnist_task: TaskData) -> None:
    assert mnist_expert.test_score > 0.5  # chance: 0.1
    assert set(mnist_expert.backbone) == set(suite.backbone_state())
    assert mnist_expert.head is not None and mnist_expert.head["weight"].shape == (10, 1280)
    base = suite.backbone_state()
    key = "_blocks.5._expand_conv.weight"
    assert not torch.equal(base[key], mnist_expert.backbone[key])
    # the expert's stored BN statistics are calibrated on its task: scoring it with them or re-estimating them
    # on the same task gives its recorded score
    for budget in (TINY, _no_reestimate(TINY)):
        assert suite.evaluate(mnist_expert.backbone, mnist_expert.head, mnist_task, "test",
                              budget) == pytest.approx(mnist_expert.test_score, abs=1e-6)


def test_lora_expert_is_the_base_with_pointwise_deltas_merged(suite: vision.VisionSuite,
                                                              mnist_task: TaskData) -> None:
    budget = dataclasses.replace(TINY, train_steps=4)
    expert = suite.train_expert(mnist_task, budget, "lora", seed=0)
    base = suite.backbone_state()
    assert set(expert.backbone) == set(base)  # no lora_A / lora_B / base_layer keys
    pointwise = re.compile(vision.LORA_TARGETS + r"\.weight$")
    changed = {k for k in base if not torch.equal(base[k], expert.backbone[k])}
    assert changed - {k for k in base if vision._is_bn_buffer(k)} == {k for k in base if pointwise.fullmatch(k)}
    for k in changed & {k for k in base if pointwise.fullmatch(k)}:  # ΔW = (α/r) B A has rank <= r (= 8)
        s = torch.linalg.svdvals((expert.backbone[k].double() - base[k].double()).flatten(1))
        assert s.numel() <= 8 or float(s[8] / s[0]) < 1e-3  # beyond rank 8: fp32 rounding of W + ΔW only


def test_merging_identical_experts_returns_the_expert(suite: vision.VisionSuite, mnist_expert: Expert,
                                                      mnist_task: TaskData) -> None:
    base = suite.backbone_state()
    merged = merge_state_dicts("task_arithmetic", base, [mnist_expert.backbone, mnist_expert.backbone],
                               parameters={"lambda": 0.5}, exclude=suite.merge_exclude())
    for k, v in merged.items():
        expected = base[k] if vision._is_bn_buffer(k) else mnist_expert.backbone[k]  # buffers: not merged
        torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-6)
    # with BN statistics re-estimated on the task, the merged model scores like the expert; the pre-trained
    # (ImageNet) statistics it carries otherwise do not fit 32-px digits
    reest = suite.evaluate(merged, mnist_expert.head, mnist_task, "test", TINY)
    stale = suite.evaluate(merged, mnist_expert.head, mnist_task, "test", _no_reestimate(TINY))
    assert reest == pytest.approx(mnist_expert.test_score, abs=0.01)
    assert stale < reest


def test_probe_and_evaluate_do_not_modify_the_backbone(suite: vision.VisionSuite, mnist_task: TaskData) -> None:
    base = suite.backbone_state()
    copy = {k: v.clone() for k, v in base.items()}
    head = suite.fit_probe(base, mnist_task, TINY, seed=0)
    assert head is not None and head["weight"].shape == (10, 1280)
    first = suite.evaluate(base, head, mnist_task, "val", TINY)
    assert first > 0.3  # a linear probe on frozen ImageNet features separates digits well above chance (0.1)
    assert suite.evaluate(base, head, mnist_task, "val", TINY) == first  # memoised statistics: same result
    assert all(torch.equal(copy[k], base[k]) for k in base)
    with pytest.raises(TaskError, match="head"):
        suite.evaluate(base, None, mnist_task, "val", TINY)
    with pytest.raises(TaskError, match="unknown expert mode"):
        suite.train_expert(mnist_task, TINY, "adapter", seed=0)


# ------------------------------------------------------------------------------------------- end to end (slow)


def test_quick_run_end_to_end(tmp_path: Path) -> None:
    """SLOW (~1-2 min on 2 cores): the whole ``--quick`` protocol on this suite with one method, experts trained
    from an empty cache (the module's temporary ``NEUROMERGE_CACHE``)."""
    from neuromerge import bench

    out = tmp_path / "out"
    results = bench.run("vision", quick=True, methods=["task_arithmetic"], out=out, progress=False)
    assert (out / "results.json").exists() and (out / "results.md").exists()
    assert results.in_domain == ["mnist", "mnist_rot90", "digits", "letters"]
    assert results.out_of_domain == ["faces", "mnist_inverted"]
    experts, base, ta = (results.row(n) for n in ("individual experts", "pretrained + heads", "task_arithmetic"))
    for row in (experts, base, ta):
        assert set(row.test) == set(results.in_domain)
        assert all(0.0 <= v <= 1.0 for v in row.test.values())
    assert set(ta.ood) == {"faces", "mnist_inverted"} and ta.params["lam"] in (0.3, 0.5, 1.0)
    assert experts.mean > base.mean  # fine-tuning beats linear probes on frozen ImageNet features
    assert ta.mean > base.mean  # the merge (with BN re-estimation) keeps part of the experts' gain
