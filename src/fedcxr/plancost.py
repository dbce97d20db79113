"""What a full study costs before it starts: wall time and disk projected from measured rates."""

from __future__ import annotations

from dataclasses import dataclass

NIH_IMAGES = 112_120
NIH_TEST = 10_120
NIH_RAW_BYTES = 45_000_000_000  # the twelve images_0NN.tar.gz archives, about 42 GiB
# Inference (no backward pass, no optimizer) takes about a third of a training step.
INFERENCE_SPEEDUP = 3.0


@dataclass(frozen=True)
class Workload:
    """The study to cost: data size, training budget, and how often it is repeated."""

    n_images: int
    test_size: int
    val_fraction: float
    image_size: int  # training resolution
    stored_size: int  # resize.size
    rounds: int
    local_epochs: int
    epochs: int  # pooled and site-alone epochs
    tasks: int
    seeds: int
    dp: bool

    @property
    def n_train(self) -> int:
        """Training images over all sites (the test set and validation splits left out)."""
        return round((self.n_images - self.test_size) * (1.0 - self.val_fraction))


@dataclass(frozen=True)
class Rates:
    """Measured throughput on the machine the study will run on."""

    decode_images_per_s: float  # one 1024 x 1024 PNG decoded and resized, all cores together
    train_images_per_s: float  # training steps at image_size, this model, this device
    dp_slowdown: float = 1.0  # training time with DP-SGD over training time without


@dataclass(frozen=True)
class Cost:
    """One part of the study: its wall time and the disk it leaves behind."""

    name: str
    seconds: float
    disk_bytes: int
    note: str = ""


def project(work: Workload, rates: Rates) -> list[Cost]:
    """The study's parts, each with wall time and disk, for the configurations the pipeline
    trains (federated, optionally its DP twin, single node, centralized, each site alone) and
    evaluates, repeated over tasks and seeds. Training work is counted in images processed:
    sites and DDP ranks that share one machine share its throughput."""
    if rates.decode_images_per_s <= 0 or rates.train_images_per_s <= 0:
        raise ValueError(f"expected positive measured rates, found {rates}")
    runs = work.tasks * work.seeds
    pixels = work.n_images * work.stored_size**2
    raw = round(NIH_RAW_BYTES * work.n_images / NIH_IMAGES)
    # ingest decodes every image to check it; resize decodes it again and scales it.
    data_s = 2 * work.n_images / rates.decode_images_per_s
    fed_epochs = work.rounds * work.local_epochs
    per_epoch = work.n_train / rates.train_images_per_s
    parts = [
        Cost("raw download (NIH PNGs)", 0.0, raw, "already on disk before the pipeline"),
        Cost("ingest + deid + resize", data_s, pixels, f"uint8 shards at {work.stored_size} px"),
        Cost("partition", pixels / 1e9, pixels, "site and test copies of the shards"),
        Cost(
            "train federated",
            runs * fed_epochs * per_epoch,
            0,
            f"{work.rounds} rounds x {work.local_epochs} local epochs",
        ),
    ]
    if work.dp:
        parts.append(
            Cost(
                "train federated (DP)",
                runs * fed_epochs * per_epoch * rates.dp_slowdown,
                0,
                f"DP-SGD at {rates.dp_slowdown:.1f}x the time",
            )
        )
    for name in ("single node", "centralized (DDP)", "each site alone"):
        parts.append(
            Cost(f"train {name}", runs * work.epochs * per_epoch, 0, f"{work.epochs} epochs")
        )
    models = 3 + int(work.dp) + 5  # federated(, DP), single node, centralized, five sites
    infer = work.test_size * models * runs / (rates.train_images_per_s * INFERENCE_SPEEDUP)
    parts.append(Cost("evaluate", infer, 0, f"{models} models x {runs} task-seed runs"))
    return parts


def format_plan(parts: list[Cost], work: Workload, rates: Rates) -> str:
    """The projection as a table a team can read before deciding to start."""
    lines = [
        f"Study: {work.n_images:,} images ({work.n_train:,} training, {work.test_size:,} test) "
        f"at {work.image_size} px, {work.tasks} task(s) x {work.seeds} seed(s)",
        f"Rates: {rates.decode_images_per_s:,.1f} images/s decoded and resized, "
        f"{rates.train_images_per_s:,.1f} training images/s",
        "",
        f"{'part':<28}{'wall time':>14}{'disk':>12}  note",
    ]
    for part in parts:
        disk = f"{part.disk_bytes / 1e9:,.1f} GB" if part.disk_bytes else "-"
        lines.append(f"{part.name:<28}{duration(part.seconds):>14}{disk:>12}  {part.note}")
    total_s = sum(p.seconds for p in parts)
    total_disk = sum(p.disk_bytes for p in parts)
    lines.append(f"{'total':<28}{duration(total_s):>14}{total_disk / 1e9:>9,.1f} GB")
    lines.append(
        "DVC's cache holds a second copy of every output unless cache.type links "
        "(reflink, hardlink or symlink) are set."
    )
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """Seconds as s, min, h or days, whichever reads best."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
