"""The device-resident data path on real KMNIST images: what a batch is, seeded shuffling,
on-device augmentation (off by default, reproducible when on), the spec blocks that drive it,
and the performance settings as they resolve on a CPU."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FIXTURE, tiny_spec
from fastai.callback.core import Callback, CancelFitException

from kmnist_tune.contract.load import parse_spec
from kmnist_tune.contract.spec import AugmentSpec, PerformanceSpec, SpecError, spec_to_dict
from kmnist_tune.training.augment import RandomAffine, stream_seed, warp
from kmnist_tune.training.loader import TensorBatches, TensorSplit, make_dls, make_split
from kmnist_tune.training.precision import Bf16Autocast, Performance, close_leaked_autocast, resolve_performance
from kmnist_tune.training.splits import Splits, load_splits
from kmnist_tune.training.train import EpochLog, build_learner, fit

CPU = torch.device("cpu")
# `splits`: the fixture's images as tiny_spec splits them, loaded once per run (shared_trained.py).


def split_of(splits: Splits, seed: int = 0) -> TensorSplit:
    mean, std = splits.mean_std
    return make_split(splits.x_train, splits.y_train, CPU, mean, std, seed)


def batches(dl: TensorBatches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(xb.clone(), yb.clone()) for xb, yb in dl]


def epoch_images(dl: TensorBatches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches(dl), strict=True)
    return torch.cat(xs), torch.cat(ys)


def raw(x: torch.Tensor, split: TensorSplit) -> torch.Tensor:
    """Normalised batch -> the 0..255 intensities it came from."""
    return x * (255.0 * split.std) + 255.0 * split.mean


# -- what a batch is ---------------------------------------------------------------------------------


def test_batches_are_normalised_float_images_with_int64_labels(splits: Splits) -> None:
    ds = split_of(splits)
    dl = TensorBatches(ds, bs=100, shuffle=True, drop_last=False)
    shapes = []
    for xb, yb in dl:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert xb.shape[1:] == (1, 28, 28) and yb.shape == (xb.shape[0],)
        assert xb.device == CPU and yb.device == CPU
        shapes.append(xb.shape[0])
    assert sum(shapes) == len(ds) and shapes[0] == 100
    x, _ = epoch_images(dl)
    # mean/std are the training split's own statistics, so a full epoch is normalised exactly.
    assert abs(float(x.mean())) < 1e-3
    assert abs(float(x.std()) - 1.0) < 1e-3
    # The same values the plain formula gives.
    first = torch.from_numpy(splits.x_train).float().div(255.0)
    expected = (first - ds.mean) / ds.std
    got = next(iter(TensorBatches(ds, bs=len(ds), shuffle=False)))[0][:, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_every_image_is_seen_once_per_epoch(splits: Splits) -> None:
    ds = split_of(splits)
    n = len(ds)
    for drop_last, bs in ((False, 128), (True, 128)):
        dl = TensorBatches(ds, bs=bs, shuffle=True, drop_last=drop_last)
        for _ in range(2):
            x, y = epoch_images(dl)
            expected_n = (n // bs) * bs if drop_last else n
            assert len(x) == expected_n
            pixels = raw(x, ds).round().clamp(0, 255).to(torch.uint8)
            keys = Counter(bytes(p.numpy().tobytes()) for p in pixels)
            assert max(keys.values()) == 1, "an image came twice in one epoch"
            # Every batch image is a training image with its own label.
            index = {splits.x_train[i].tobytes(): int(splits.y_train[i]) for i in range(n)}
            assert all(index[bytes(p.numpy().tobytes())] == int(lbl) for p, lbl in zip(pixels, y, strict=True))
            if not drop_last:
                assert len(keys) == len(index)


def test_shuffle_is_reproducible_per_seed_and_differs_per_epoch(splits: Splits) -> None:
    a = TensorBatches(split_of(splits, seed=3), bs=64, shuffle=True, drop_last=True)
    b = TensorBatches(split_of(splits, seed=3), bs=64, shuffle=True, drop_last=True)
    c = TensorBatches(split_of(splits, seed=4), bs=64, shuffle=True, drop_last=True)
    ya0, ya1 = epoch_images(a)[1], epoch_images(a)[1]
    yb0, yb1 = epoch_images(b)[1], epoch_images(b)[1]
    yc0 = epoch_images(c)[1]
    assert torch.equal(ya0, yb0) and torch.equal(ya1, yb1), "same seed, same order"
    assert not torch.equal(ya0, ya1), "a new order every epoch"
    assert not torch.equal(ya0, yc0), "another seed, another order"


def test_validation_loader_is_in_order_and_never_augmented(splits: Splits) -> None:
    mean, std = splits.mean_std
    train = split_of(splits)
    valid = make_split(splits.x_valid, splits.y_valid, CPU, mean, std)
    dls = make_dls(train, valid, 32, CPU, augment=RandomAffine(0.2, 30, 0.2))
    assert dls.train.augment is not None and dls.valid.augment is None
    assert not dls.valid.shuffle and dls.train.shuffle and dls.train.drop_last
    x, y = epoch_images(dls.valid)
    assert torch.equal(y, torch.from_numpy(splits.y_valid.astype(np.int64)))
    torch.testing.assert_close(raw(x, valid)[:, 0], torch.from_numpy(splits.x_valid).float(), atol=1e-3, rtol=0)


# -- augmentation ------------------------------------------------------------------------------------


def test_augmentation_is_off_by_default_and_off_means_untouched(splits: Splits) -> None:
    assert RandomAffine.from_spec(AugmentSpec()) is None
    assert RandomAffine.from_spec(None) is None
    assert RandomAffine.from_spec({"enabled": False, "max_shift": 0.3}) is None
    plain = TensorBatches(split_of(splits), bs=64, shuffle=True, drop_last=True)
    off = TensorBatches(split_of(splits), bs=64, shuffle=True, drop_last=True, augment=RandomAffine.from_spec(AugmentSpec()))
    for (xp, yp), (xo, yo) in zip(batches(plain), batches(off), strict=True):
        assert torch.equal(xp, xo) and torch.equal(yp, yo)


def test_zero_ranges_are_the_identity(splits: Splits) -> None:
    """The warp's geometry: with nothing to draw, grid_sample reads every pixel centre exactly."""
    plain = TensorBatches(split_of(splits), bs=64, shuffle=True, drop_last=True)
    ident = TensorBatches(split_of(splits), bs=64, shuffle=True, drop_last=True, augment=RandomAffine(0.0, 0.0, 0.0))
    for (xp, yp), (xi, yi) in zip(batches(plain), batches(ident), strict=True):
        assert torch.equal(yp, yi)
        torch.testing.assert_close(xi, xp, atol=1e-4, rtol=0)


def _centroids(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) intensities -> (B, 2) centre of mass (x, y) in pixels."""
    h, w = x.shape[-2:]
    m = x[:, 0].clamp(min=0)
    total = m.sum(dim=(1, 2)).clamp(min=1e-6)
    cx = (m.sum(dim=1) * torch.arange(w)).sum(dim=1) / total
    cy = (m.sum(dim=2) * torch.arange(h)).sum(dim=1) / total
    return torch.stack([cx, cy], dim=1)


def test_shift_moves_characters_by_the_drawn_amount(splits: Splits) -> None:
    aug = RandomAffine(max_shift=0.1, max_rotate=0.0, max_scale=0.0)
    x = torch.from_numpy(splits.x_train[:256]).float().unsqueeze(1)
    theta = aug.epoch_thetas(len(x), seed=0, epoch=0)
    moved = warp(x, theta)
    # With no rotation or scale the matrix is [[1, 0, -tx], [0, 1, -ty]] in [-1, 1] coordinates.
    expected = -theta[:, :, 2] * 14.0  # pixels: half the side per unit
    assert float(expected.abs().max()) <= 0.1 * 28 + 1e-4
    got = _centroids(moved) - _centroids(x)
    for axis in (0, 1):
        r = np.corrcoef(expected[:, axis].numpy(), got[:, axis].numpy())[0, 1]
        assert r > 0.9, f"axis {axis}: shift and centroid move correlate only {r:.2f}"
    assert float((got - expected).abs().median()) < 0.5


def test_augmentation_changes_pixels_but_keeps_shape_labels_and_mass(splits: Splits) -> None:
    ds = split_of(splits, seed=1)
    plain = batches(TensorBatches(ds, bs=64, shuffle=True, drop_last=True))
    aug = batches(TensorBatches(ds, bs=64, shuffle=True, drop_last=True, augment=RandomAffine()))
    assert len(plain) == len(aug)
    ratios = []
    for (xp, yp), (xa, ya) in zip(plain, aug, strict=True):
        assert xa.shape == xp.shape and xa.dtype == xp.dtype == torch.float32
        assert torch.equal(ya, yp), "augmentation must not change the order or the labels"
        assert (xa - xp).abs().mean() > 0.05, "augmentation left the batch as it was"
        rp, ra = raw(xp, ds), raw(xa, ds)
        assert float(ra.min()) > -1e-2 and float(ra.max()) < 255.0 + 1e-2, "interpolation stays within 0..255"
        ratios.append(ra.sum(dim=(1, 2, 3)) / rp.sum(dim=(1, 2, 3)))
    r = torch.cat(ratios)
    # Scale within 1 +- 0.1 changes the ink by up to ~21%; a shift may push a little out of the frame.
    assert 0.9 < float(r.mean()) < 1.1, float(r.mean())
    assert float(r.min()) > 0.5 and float(r.max()) < 1.5


def test_augmentation_is_reproducible_per_seed_and_new_each_epoch(splits: Splits) -> None:
    def run(seed: int, epochs: int = 2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        dl = TensorBatches(split_of(splits, seed), bs=128, shuffle=True, drop_last=True, augment=RandomAffine())
        return [batches(dl) for _ in range(epochs)]

    a, b, c = run(5), run(5), run(6, epochs=1)
    for ea, eb in zip(a, b, strict=True):
        for (xa, ya), (xb, yb) in zip(ea, eb, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0][0], c[0][0][0])
    # Epoch 1 draws new matrices (and a new order): compare the same image in both epochs.
    t0 = RandomAffine().epoch_thetas(64, seed=5, epoch=0)
    t1 = RandomAffine().epoch_thetas(64, seed=5, epoch=1)
    assert not torch.allclose(t0, t1)
    assert torch.equal(t0, RandomAffine().epoch_thetas(64, seed=5, epoch=0))
    assert len({stream_seed(s, e, 1) for s in range(10) for e in range(10)}) == 100


def test_augment_ranges_are_checked() -> None:
    with pytest.raises(ValueError, match="max_shift"):
        RandomAffine(max_shift=0.8)
    aug = RandomAffine.from_spec(AugmentSpec(enabled=True, max_shift=0.05, max_rotate=5, max_scale=0.2))
    assert aug == RandomAffine(0.05, 5.0, 0.2)


# -- the spec blocks -----------------------------------------------------------------------------------


def base(**over: Any) -> dict[str, Any]:
    return {"name": "t", "budget": {"n_trials": 1}, **over}


def one_line_error(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip()
    return msg


def test_spec_blocks_default_to_todays_behaviour() -> None:
    spec = parse_spec(base())
    assert spec.augment == AugmentSpec(enabled=False, max_shift=0.1, max_rotate=10.0, max_scale=0.1)
    assert spec.performance == PerformanceSpec(precision="auto", channels_last="auto", cudnn_benchmark=True, compile="auto")
    # auto on a CPU is plain fp32 in the default memory format, as before.
    assert resolve_performance(spec.performance, CPU) == Performance("fp32", False, False, False)
    again = parse_spec(spec_to_dict(spec))
    assert again.augment == spec.augment and again.performance == spec.performance


def test_spec_blocks_validate() -> None:
    spec = parse_spec(
        base(
            augment={"enabled": True, "max_shift": 0.05, "max_rotate": 15, "max_scale": 0.2},
            performance={"precision": "bf16", "channels_last": False, "cudnn_benchmark": False, "compile": True},
        )
    )
    assert spec.augment.enabled and spec.augment.max_rotate == 15.0
    assert spec.performance.precision == "bf16" and spec.performance.channels_last is False and spec.performance.compile
    assert "unknown key 'enable' in augment (did you mean 'enabled'?)" in one_line_error(base(augment={"enable": True}))
    assert "unknown key 'precison' in performance" in one_line_error(base(performance={"precison": "bf16"}))
    assert "unknown key 'perfomance'" in one_line_error(base(perfomance={}))
    assert "performance.precision" in one_line_error(base(performance={"precision": "fp16"}))
    assert "performance.channels_last" in one_line_error(base(performance={"channels_last": "sometimes"}))
    assert "augment.max_shift" in one_line_error(base(augment={"max_shift": -0.1}))
    assert "augment.max_scale" in one_line_error(base(augment={"max_scale": 1.0}))


# -- performance settings on a CPU ------------------------------------------------------------------------


def test_performance_resolves_per_device() -> None:
    cuda = torch.device("cuda")
    assert resolve_performance(None, CPU) == Performance("fp32", False, False, False)
    assert resolve_performance({"precision": "bf16", "channels_last": True}, CPU) == Performance("bf16", True, False, False)
    on_cuda = resolve_performance(PerformanceSpec(), cuda)
    assert on_cuda.channels_last and on_cuda.cudnn_benchmark and on_cuda.compile  # compile: auto is on there
    if not torch.cuda.is_available():
        assert on_cuda.precision == "fp32"  # auto asks the device whether it has bf16
    off = resolve_performance(PerformanceSpec(precision="fp32", channels_last=False, cudnn_benchmark=False, compile=False), cuda)
    assert off == Performance("fp32", False, False, False)


class StopAfter(Callback):
    """Stops a fit after a few training batches (the tests need the wiring, not a trained model)."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def after_batch(self) -> None:
        if self.training:
            self.seen += 1
            if self.seen >= self.n:
                raise CancelFitException()


def test_explicit_bf16_on_cpu_autocasts_and_closes_its_context(splits: Splits) -> None:
    params = {**parse_spec(tiny_spec()).fixed_params(), "lr": 5e-3}
    learn, _ = build_learner(splits, params, CPU, "accuracy", performance={"precision": "bf16", "channels_last": True})
    assert learn.kt_performance.precision == "bf16"
    assert any(isinstance(cb, Bf16Autocast) for cb in learn.cbs)
    conv = learn.model[0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen: list[tuple[torch.dtype, bool, bool]] = []

    def hook(m: torch.nn.Module, i: tuple[torch.Tensor, ...], o: torch.Tensor) -> None:
        x = i[0]
        seen.append((o.dtype, x.stride(1) == 1, o.is_contiguous(memory_format=torch.channels_last)))

    handle = conv.register_forward_hook(hook)
    try:
        learn.fit_one_cycle(1, 5e-3, cbs=[StopAfter(2)])
    finally:
        handle.remove()
    assert seen and all(d == torch.bfloat16 for d, _, _ in seen)
    # One-channel batches carry exact channels-last strides, so the first conv already writes channels-last.
    assert all(in_cl and out_cl for _, in_cl, out_cl in seen)
    assert not torch.is_autocast_enabled("cpu")


def test_a_batch_that_dies_mid_forward_does_not_leave_autocast_on(splits: Splits) -> None:
    """An out-of-memory error between fastai's before_batch and after_loss skips MixedPrecision's exit;
    the next Learner (the batch-halving restart) must not start inside the stale context."""

    class Boom(Callback):
        def after_pred(self) -> None:
            raise RuntimeError("out of memory (injected)")

    params = {**parse_spec(tiny_spec()).fixed_params(), "lr": 5e-3}
    learn, _ = build_learner(splits, params, CPU, "accuracy", performance={"precision": "bf16"})
    with pytest.raises(RuntimeError, match="out of memory"):
        learn.fit_one_cycle(1, 5e-3, cbs=[Boom()])
    assert torch.is_autocast_enabled("cpu")  # what fastai leaves behind
    build_learner(splits, params, CPU, "accuracy")
    assert not torch.is_autocast_enabled("cpu")
    assert close_leaked_autocast() == 0


def test_a_short_fit_with_augmentation_works(splits: Splits) -> None:
    spec = parse_spec(tiny_spec(augment={"enabled": True}, data={"train_size": 320, "valid_size": 120}))
    small = load_splits(spec.data, FIXTURE, download=False)
    params = {**spec.fixed_params(), "lr": 5e-3}
    learn, name = build_learner(small, params, CPU, "accuracy", seed=0, augment=spec.augment, performance=spec.performance)
    assert learn.dls.train.augment is not None and learn.dls.valid.augment is None
    result = fit(learn, params, EpochLog(name))
    assert len(result.epochs) == 1
    rec = result.epochs[0]
    assert math.isfinite(rec.train_loss) and math.isfinite(rec.valid_loss) and 0.0 <= rec.metric <= 1.0
    assert rec.images_per_s > 0


def test_the_device_copies_are_made_once_per_process() -> None:
    """A worker's attempts share their splits' device copies (the `meta` device stands in for a GPU
    here: it is a device other than the CPU, with no memory behind it); other arrays get their own,
    and only the last few are kept."""
    from kmnist_tune.training import loader

    meta = torch.device("meta")
    x, y = np.zeros((10, 28, 28), np.uint8), np.arange(10)
    first, again = make_split(x, y, meta, 0.2, 0.3), make_split(x, y, meta, 0.2, 0.3, seed=5)
    assert first.x.device.type == "meta" and first.x is again.x and first.y is again.y and again.seed == 5
    other = make_split(x.copy(), y, meta, 0.2, 0.3)
    assert other.x is not first.x
    for _ in range(loader._KEEP):
        make_split(np.zeros((2, 28, 28), np.uint8), np.arange(2), meta, 0.2, 0.3)
    assert make_split(x, y, meta, 0.2, 0.3).x is not first.x  # pushed out by newer ones
    on_cpu = make_split(x, y, CPU, 0.2, 0.3)
    assert on_cpu.x.data_ptr() == x.__array_interface__["data"][0]  # the CPU shares the array itself
