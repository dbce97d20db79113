"""The training layer on tiny site folders: learning, determinism, DP accounting, FedProx, AUROC."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.accountants import RDPAccountant
from sklearn.metrics import roc_auc_score

from fedcxr.config import ConfigError, DPConfig, Params, TrainConfig, parse_params
from fedcxr.labels import FINDINGS
from fedcxr.models import build_model
from fedcxr.sitedata import INDEX_COLUMNS, SiteData
from fedcxr.train import (
    XrayDataset,
    accounting,
    evaluate_auroc,
    labels_for,
    load_plain_state_dict,
    loop,
    make_loader,
    make_private,
    make_setup,
    plain_state_dict,
    pos_weight,
    predict,
    seed_everything,
    threads_per_process,
    train_epoch,
)
from fedcxr.train.augment import AUG_FIELDS, model_input
from fedcxr.train.data import to_input
from fedcxr.train.loop import TrainSetup, autocast_dtype, batch_to_device, full_fp32

CPU = torch.device("cpu")
STORED = 64  # pixels of the tiny site folders
SIZE = 32  # training resolution in these tests


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    # seed_everything switches deterministic kernels on for the whole process; undo it.
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)


def make_site(folder: Path, n: int = 128, seed: int = 0, val_fraction: float = 0.25) -> SiteData:
    """n noisy 64x64 images; odd rows carry a bright square and Pneumonia=1 (and Effusion=1)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(
        folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, STORED, STORED)
    )
    positive = np.arange(n) % 2
    for i in range(n):
        image = rng.normal(80.0, 20.0, (STORED, STORED))
        if positive[i]:
            side = 16
            r, c = rng.integers(8, STORED - 8 - side, size=2)
            image[r : r + side, c : c + side] += 120.0
        images[i] = np.clip(image, 0, 255)
    images.flush()
    del images
    index = pd.DataFrame(
        {
            "image_id": [f"{i:08d}_000.png" for i in range(n)],
            "patient_id": [f"p{i}" for i in range(n)],
            "split": np.where(np.arange(n) < round(n * (1 - val_fraction)), "train", "val"),
            **{f: rng.integers(0, 2, n) for f in FINDINGS},
            "age": 50,
            "sex": "M",
            "view": "PA",
        }
    )
    index["Pneumonia"] = positive
    index["Effusion"] = positive
    index.loc[:, list(INDEX_COLUMNS)].to_csv(folder / "index.csv", index=False)
    return SiteData.open(folder)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> SiteData:
    return make_site(tmp_path_factory.mktemp("sites") / "A")


def _setup(site: SiteData, seed: int, lr: float = 3e-3, dp_safe: bool = False, augment=True):
    seed_everything(seed)
    data = XrayDataset.from_split([site], "train", "pneumonia", SIZE, augment=augment, seed=seed)
    cfg = TrainConfig(lr=lr, batch_size=16, image_size=SIZE)
    model = build_model("smallcnn", 1, dp_safe=dp_safe)
    setup = make_setup(model, cfg, "pneumonia", data.labels, CPU)
    return setup, make_loader(data, cfg.batch_size, shuffle=True, seed=seed)


def _distance(model: torch.nn.Module, center: dict[str, torch.Tensor]) -> float:
    current = plain_state_dict(model)
    names = [n for n, _ in model.named_parameters()]
    names = [n.removeprefix("_module.") for n in names]
    return float(sum(((current[n] - center[n]) ** 2).sum() for n in names) ** 0.5)


# --- data -----------------------------------------------------------------------------------


def test_dataset_items_are_uint8_images_the_model_input_normalises(site):
    plain = XrayDataset.from_split([site], "train", "multilabel", STORED, augment=False)
    x, y = plain[3]
    assert x.shape == (1, STORED, STORED) and x.dtype == torch.uint8  # 4x less to copy
    assert y.shape == (14,) and y.dtype == torch.float32
    expected = (torch.from_numpy(site.images[3].astype(np.float32)) / 255 - 0.5) / 0.25
    torch.testing.assert_close(model_input(x[None], None)[0, 0], expected)
    small = XrayDataset.from_split([site], "val", "pneumonia", SIZE, augment=True, seed=1)
    x, y, aug = small[0]
    assert x.shape == (1, SIZE, SIZE) and y.shape == (1,) and aug.shape == (len(AUG_FIELDS),)
    assert len(small) == len(site.rows("val"))
    # Below the stored size the items come from a copy made once with Pillow's resize: the
    # pixels to_input (Grad-CAM, one image) gives the model.
    row = site.rows("val")[0]
    plain = XrayDataset.from_split([site], "val", "pneumonia", SIZE)
    torch.testing.assert_close(
        model_input(plain[0][0][None], None)[0], to_input(site.images[row], SIZE), rtol=0, atol=0
    )


def test_augmentation_depends_only_on_seed_epoch_and_index(site):
    data = XrayDataset.from_split([site], "train", "pneumonia", SIZE, augment=True, seed=7)
    again = XrayDataset.from_split([site], "train", "pneumonia", SIZE, augment=True, seed=7)
    assert torch.equal(data[5][2], again[5][2]) and torch.equal(data[5][0], again[5][0])
    first = data[5][2]
    data.set_epoch(1)
    assert not torch.equal(first, data[5][2])
    data.set_epoch(0)
    assert torch.equal(first, data[5][2])
    batch = [torch.stack(parts) for parts in zip(data[5], data[6], strict=True)]
    x, _ = batch_to_device(batch, CPU)
    assert x.shape == (2, 1, SIZE, SIZE) and x.dtype == torch.float32
    assert not torch.equal(x, model_input(batch[0], None))  # augmented


def test_pooled_dataset_spans_sites(tmp_path, site):
    other = make_site(tmp_path / "B", n=20, seed=3)
    pooled = XrayDataset.from_split([site, other], "train", "pneumonia", SIZE)
    assert len(pooled) == len(site.rows("train")) + len(other.rows("train"))
    single = XrayDataset.from_split([other], "train", "pneumonia", SIZE)
    assert torch.equal(pooled[len(site.rows("train"))][0], single[0][0])


def test_pickled_dataset_reopens_the_memmap_instead_of_copying_pixels(site):
    data = XrayDataset.from_split([site], "train", "pneumonia", STORED, augment=True, seed=2)
    blob = pickle.dumps(data)
    assert len(blob) < site.images.nbytes / 10
    copy = pickle.loads(blob)
    assert torch.equal(copy[7][0], data[7][0]) and torch.equal(copy[7][2], data[7][2])
    # Below the stored size a worker gets the training copy (SIZE^2 per row), not the stored
    # pixels.
    small = XrayDataset.from_split([site], "train", "pneumonia", SIZE, augment=True, seed=2)
    assert len(pickle.dumps(small)) < len(small) * SIZE * SIZE + 100_000


def test_image_size_above_stored_size_is_an_error_naming_the_folder(site):
    with pytest.raises(ValueError, match=r"image_size <= the stored image size 64") as info:
        XrayDataset.from_split([site], "train", "pneumonia", 128)
    assert str(site.folder) in str(info.value)


def test_labels_for_each_task_and_missing_columns(site):
    assert labels_for("multilabel", site.index).shape == (len(site.index), 14)
    pneumonia = labels_for("pneumonia", site.index)
    assert pneumonia.shape == (len(site.index), 1) and pneumonia.dtype == np.float32
    assert np.array_equal(pneumonia[:, 0], site.index["Pneumonia"].to_numpy())
    with pytest.raises(ValueError, match=r"\['Pneumonia'\]"):
        labels_for("pneumonia", site.index.drop(columns="Pneumonia"), "siteA/index.csv")
    with pytest.raises(ValueError, match="multilabel"):
        labels_for("cancer", site.index)


def test_pos_weight_is_negatives_over_positives_capped():
    labels = np.array([1, 1, 1] + [0] * 7, dtype=np.float32)[:, None]
    assert pos_weight("pneumonia", labels).tolist() == pytest.approx([7 / 3])
    rare = np.zeros((1000, 1), dtype=np.float32)
    rare[0] = 1
    assert pos_weight("pneumonia", rare).tolist() == [100.0]
    assert pos_weight("pneumonia", np.zeros((50, 1))).tolist() == [50.0]
    assert pos_weight("multilabel", np.ones((4, 14))) is None
    setup = make_setup(build_model("smallcnn", 1), TrainConfig(lr=1e-3), "pneumonia", labels, CPU)
    assert setup.loss_fn.pos_weight.tolist() == pytest.approx([7 / 3])


# --- training -------------------------------------------------------------------------------


def test_smallcnn_learns_the_bright_square(site):
    setup, loader = _setup(site, seed=0)
    losses = [train_epoch(setup, loader).loss for _ in range(4)]
    assert losses[-1] < losses[0]
    val = XrayDataset.from_split([site], "val", "pneumonia", SIZE)
    probs, labels = predict(setup.model, make_loader(val, 64, shuffle=False), CPU)
    assert probs.shape == labels.shape == (len(val), 1)
    assert evaluate_auroc(probs, labels)["macro"] > 0.8


def test_same_seed_gives_identical_weights(site):
    runs = []
    for _ in range(2):
        setup, loader = _setup(site, seed=11)
        for _ in range(2):
            train_epoch(setup, loader)
        runs.append(plain_state_dict(setup.model))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_worker_processes_do_not_change_the_batches(site):
    data = XrayDataset.from_split([site], "train", "pneumonia", SIZE, augment=True, seed=3)
    data.set_epoch(2)
    inline = list(make_loader(data, 16, shuffle=True, seed=3))
    workers = list(make_loader(data, 16, shuffle=True, seed=3, num_workers=2))
    assert len(inline) == len(workers)
    for a, b in zip(inline, workers, strict=True):  # images, labels, augmentation
        assert all(torch.equal(pa, pb) for pa, pb in zip(a, b, strict=True))


def test_a_fixed_seed_gives_identical_weights_whatever_the_worker_count(site):
    weights = []
    for workers in (0, 2):
        setup, loader = _setup(site, seed=11)
        loader = make_loader(loader.dataset, 16, shuffle=True, seed=11, num_workers=workers)
        for _ in range(2):
            train_epoch(setup, loader)
        weights.append(plain_state_dict(setup.model))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _train_with_prox(site, mu: float, dp: bool) -> float:
    setup, loader = _setup(site, seed=5, lr=1e-2, dp_safe=dp, augment=False)
    center = plain_state_dict(setup.model)
    if dp:
        setup, loader, _ = make_private(setup, loader, DPConfig(enabled=True), epochs_total=2)
    for _ in range(2):
        train_epoch(setup, loader, prox_center=center, prox_mu=mu)
    return _distance(setup.model, center)


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_fedprox_keeps_weights_near_the_center(site, dp):
    free = _train_with_prox(site, mu=0.0, dp=dp)
    held = _train_with_prox(site, mu=10.0, dp=dp)
    assert 0 < held < free


def test_prox_center_must_match_the_model(site):
    setup, loader = _setup(site, seed=0)
    with pytest.raises(KeyError, match="prox_center lacks"):
        train_epoch(setup, loader, prox_center={"nope": torch.zeros(1)}, prox_mu=0.1)


# --- differential privacy -------------------------------------------------------------------


def test_dp_epsilon_matches_a_fresh_rdp_accountant_and_grows(site):
    setup, loader = _setup(site, seed=2, dp_safe=True)
    dp = DPConfig(
        enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, accountant="rdp"
    )
    setup, loader, engine = make_private(setup, loader, dp, epochs_total=2)
    steps, epsilons = 0, []
    for _ in range(2):
        steps += train_epoch(setup, loader).steps
        epsilons.append(engine.get_epsilon(dp.delta))
    assert epsilons[1] > epsilons[0] > 0
    fresh = RDPAccountant()
    for _ in range(steps):
        fresh.step(noise_multiplier=1.0, sample_rate=1 / len(loader))
    assert epsilons[1] == pytest.approx(fresh.get_epsilon(dp.delta), rel=1e-9)
    assert isinstance(setup, TrainSetup) and setup.amp is False


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_target_epsilon_is_met_over_all_planned_epochs(site, kind):
    setup, loader = _setup(site, seed=3, dp_safe=True)
    dp = DPConfig(enabled=True, target_epsilon=4.0, delta=1e-5, accountant=kind)
    setup, loader, engine = make_private(setup, loader, dp, epochs_total=3)
    assert engine.accountant.mechanism() == kind
    for _ in range(3):
        train_epoch(setup, loader)
    epsilon = accounting.epsilon(engine.accountant.history, dp.delta, kind)
    assert epsilon <= 4.0
    assert epsilon > 3.0  # calibrated for the whole run, not a much noisier guess


def test_make_private_rejects_a_model_that_is_not_dp_safe(site):
    setup, loader = _setup(site, seed=0)
    with pytest.raises(ValueError, match="dp_safe=True"):
        make_private(setup, loader, DPConfig(enabled=True), epochs_total=1)


def test_plain_state_dict_strips_the_opacus_prefix_and_loads_into_both(site):
    setup, loader = _setup(site, seed=4, dp_safe=True)
    bare_keys = set(setup.model.state_dict())
    private, loader, _ = make_private(setup, loader, DPConfig(enabled=True), epochs_total=1)
    assert all(k.startswith("_module.") for k in private.model.state_dict())
    plain = plain_state_dict(private.model)
    assert set(plain) == bare_keys
    train_epoch(private, loader)
    trained = plain_state_dict(private.model)
    fresh = build_model("smallcnn", 1, dp_safe=True)
    load_plain_state_dict(fresh, trained)
    assert all(torch.equal(fresh.state_dict()[k], trained[k]) for k in trained)
    load_plain_state_dict(private.model, plain)  # back to the initial weights, wrapped model
    assert all(torch.equal(plain_state_dict(private.model)[k], plain[k]) for k in plain)


# --- precision: bf16 for training on CUDA, fp32 for every prediction -----------------------


class AutocastSpy(torch.nn.Module):
    """Wraps a model; records, for each forward, whether autocast was on for the input's device."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.autocast: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.autocast.append(torch.is_autocast_enabled(x.device.type))
        return self.inner(x)


def test_autocast_dtype_is_bf16_for_training_on_cuda_only(monkeypatch):
    assert autocast_dtype("cuda", "train") is torch.bfloat16
    assert autocast_dtype("cuda", "train", bf16_supported=False) is None
    assert autocast_dtype("cuda", "predict") is None
    assert autocast_dtype("cpu", "train") is None
    assert autocast_dtype("cpu", "predict") is None
    with pytest.raises(ValueError, match="'evaluate'"):
        autocast_dtype("cuda", "evaluate")
    # make_setup's decision: a bf16-capable GPU trains with autocast, a CPU never does
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert loop._amp_ok(torch.device("cuda")) is True
    assert loop._amp_ok(CPU) is False


def test_predict_runs_in_fp32_even_where_training_autocasts(site, monkeypatch):
    # The CPU stands in for a bf16 GPU: training takes the autocast path, prediction must not.
    monkeypatch.setattr(loop, "_amp_ok", lambda device: True)
    seed_everything(0)
    data = XrayDataset.from_split([site], "train", "pneumonia", SIZE, augment=False, seed=0)
    cfg = TrainConfig(lr=3e-3, batch_size=16, image_size=SIZE)
    spy = AutocastSpy(build_model("smallcnn", 1))
    setup = make_setup(spy, cfg, "pneumonia", data.labels, CPU)
    assert setup.amp
    train_epoch(setup, make_loader(data, cfg.batch_size, shuffle=True, seed=0))
    assert spy.autocast and all(spy.autocast)  # training keeps bf16 autocast

    val = XrayDataset.from_split([site], "val", "pneumonia", SIZE)
    loader = make_loader(val, 8, shuffle=False)
    spy.autocast.clear()
    probs, _ = predict(spy, loader, CPU)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast region, too
        inside, _ = predict(spy, loader, CPU)
    assert len(spy.autocast) == 2 * len(loader) and not any(spy.autocast)
    spy.eval()
    with torch.no_grad():
        inputs = [model_input(x, None) for x, _ in loader]
        fp32 = torch.cat([torch.sigmoid(spy.inner(x)) for x in inputs]).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = torch.cat([torch.sigmoid(spy.inner(x)).float() for x in inputs]).numpy()
    assert np.abs(bf16 - fp32).max() > 1e-4  # bf16 would be visible at this tolerance
    np.testing.assert_allclose(probs, fp32, rtol=0, atol=1e-6)
    np.testing.assert_allclose(inside, fp32, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_full_fp32_turns_tf32_off_on_cuda_and_restores_it():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with full_fp32(torch.device("cuda")):
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        assert not torch.is_autocast_enabled("cuda")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with pytest.raises(RuntimeError, match="boom"), full_fp32(torch.device("cuda")):
        raise RuntimeError("boom")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with full_fp32(CPU):
        assert not torch.is_autocast_enabled("cpu")
        assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_every_metric_path_predicts_through_the_fp32_predict():
    from fedcxr.evaluation import evaluate
    from fedcxr.federation import site_trainer

    # evaluation (test metrics and validation thresholds) and the sites' validation AUROC
    assert evaluate.predict is loop.predict
    assert site_trainer.predict is loop.predict


# --- evaluation, threads, config ------------------------------------------------------------


def test_evaluate_auroc_matches_sklearn_and_skips_single_class_labels():
    rng = np.random.default_rng(0)
    labels = np.stack([rng.integers(0, 2, 40), rng.integers(0, 2, 40), np.zeros(40)], axis=1)
    probs = rng.random((40, 3))
    result = evaluate_auroc(probs, labels, names=["a", "b", "c"])
    expected = [roc_auc_score(labels[:, j], probs[:, j]) for j in range(2)]
    assert result["per_label"]["a"] == pytest.approx(expected[0])
    assert result["per_label"]["b"] == pytest.approx(expected[1])
    assert result["per_label"]["c"] is None
    assert result["macro"] == pytest.approx(np.mean(expected))
    named = evaluate_auroc(rng.random((40, 14)), rng.integers(0, 2, (40, 14)))
    assert list(named["per_label"]) == list(FINDINGS)
    assert evaluate_auroc(probs[:, 2:], labels[:, 2:])["macro"] is None


def test_threads_per_process_shares_the_cores():
    assert threads_per_process(1, cores=16) == 16
    assert threads_per_process(5, cores=16) == 3
    assert threads_per_process(4, cores=2) == 1
    with pytest.raises(ValueError):
        threads_per_process(0)


def test_training_sections_have_documented_defaults_and_checks():
    params = Params()
    assert params.task == "multilabel" and params.model.arch == "smallcnn"
    assert params.train.seeds == (42,) and params.dp.target_epsilon is None
    assert parse_params({"train": {"seeds": [1, 2, 3]}}).train.seeds == (1, 2, 3)
    for data, named in [
        ({"train": {"seeds": []}}, "'train.seeds'"),
        ({"train": {"image_size": 1024}}, "resize.size"),
        ({"task": "binary"}, "'task'"),
        ({"dp": {"target_epsilon": "3"}}, "'dp.target_epsilon'"),
        ({"model": {"pretrained": "yes"}}, "'model.pretrained'"),
    ]:
        with pytest.raises(ConfigError, match=named):
            parse_params(data)
    big = parse_params({"resize": {"size": 1024}, "train": {"image_size": 1024}})
    assert big.train.image_size == 1024


def test_train_compile_trains_through_the_compiled_forward_and_keeps_the_weights(site, monkeypatch):
    calls: list[int] = []
    real_compile = torch.compile

    def eager_compile(model):  # torch.compile's own wrapper, without generating code
        model.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
        return real_compile(model, backend="eager")

    monkeypatch.setattr(loop.torch, "compile", eager_compile)
    data = XrayDataset.from_split([site], "train", "pneumonia", SIZE, augment=True, seed=0)
    cfg = TrainConfig(lr=1e-2, batch_size=16, image_size=SIZE, compile=True)
    model = build_model("smallcnn", 1, dp_safe=True)
    setup = make_setup(model, cfg, "pneumonia", data.labels, CPU)
    before = {k: v.clone() for k, v in plain_state_dict(setup.model).items()}
    stats = train_epoch(setup, make_loader(data, 16, shuffle=True, seed=0))
    assert sum(calls) == stats.examples == len(data)
    after = plain_state_dict(setup.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the model learnt
    private, _, _ = make_private(
        setup, make_loader(data, 16, shuffle=True), DPConfig(enabled=True), 1
    )
    assert private.compiled is None  # Opacus' hooks need the plain module


def test_scheduled_lr_cosine_decays_from_base_towards_zero() -> None:
    from fedcxr.train.loop import scheduled_lr

    lrs = [scheduled_lr(1e-3, e, 10, "cosine") for e in range(10)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(5e-4)
    assert all(a > b for a, b in itertools.pairwise(lrs)) and lrs[-1] < 0.03e-3
    assert scheduled_lr(1e-3, 7, 10, "constant") == 1e-3
    with pytest.raises(ValueError, match="epoch"):
        scheduled_lr(1e-3, 10, 10, "cosine")
    with pytest.raises(ValueError, match="lr_schedule"):
        scheduled_lr(1e-3, 0, 10, "step")


def test_auto_lr_must_be_resolved_before_an_optimizer_is_built() -> None:
    with pytest.raises(ValueError, match="ARCH_LR"):
        make_setup(build_model("smallcnn", 1), TrainConfig(), "pneumonia", np.zeros((4, 1)), CPU)
