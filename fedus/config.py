"""One typed run config, loaded from TOML and overridable from the CLI or Flower.

The same object travels three ways: a scenario TOML file (`simulations/`),
`key=value` overrides from the command line, and Flower's flat `run_config`
(dotted, kebab-case keys such as `train.batch-size`). Keeping one schema for all
three means a value set anywhere is validated the same way.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user-facing configuration mistake (printed as one line by the CLI)."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=_kebab, populate_by_name=True, validate_assignment=True
    )


class DataConfig(_Section):
    source: Literal["synthetic", "manifest"] = "synthetic"
    manifest: str = Field("", description="manifest CSV (absolute path) when source = manifest")
    site_column: str = Field("center", description="manifest column that names the site")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    image_size: int = Field(64, ge=16)
    synthetic_centres: int = Field(3, ge=1)
    synthetic_images_per_centre: int = Field(120, ge=10)
    max_images_per_site: int = Field(0, ge=0, description="0 = all; caps CI-sized runs")
    augment_policy: Literal["ultrasound", "natural"] = Field(
        "ultrasound", description="training augmentation (train.augment = true): ultrasound-aware or ImageNet-style")
    held_out: str = Field("", description="comma-separated sites kept out of the federation and the teacher fit "
                                          "(leave-one-centre-out); `fedus evaluate` scores them as unseen centres")

    @property
    def held_out_sites(self) -> list[str]:
        return [s.strip() for s in self.held_out.split(",") if s.strip()]


RANDOM_INIT_SOURCE = "random init (no weights given); not a foundation model"


class TeacherConfig(_Section):
    arch: str = "vit_tiny_patch16_224"
    weights: str = Field("", description="local .safetensors/.pth file; empty = random init")
    source: str = Field(
        RANDOM_INIT_SOURCE,
        description="where the weights came from; printed on every report",
    )
    blocks: str = Field("2", description="'N' = last N blocks, or '4,8,12' = block indices")
    combine: Literal["mean", "concat"] = "mean"

    @model_validator(mode="after")
    def _source_matches_weights(self) -> "TeacherConfig":
        """A weights file with the random-init label (e.g. `--set teacher.weights=...` without a source)
        would put a false provenance on every report: label it as the user's file instead."""
        if self.weights and self.source == RANDOM_INIT_SOURCE:
            self.source = f"weights file given by the user: {Path(self.weights).name}"
        return self


def _key_hint(key: str, known: dict[str, Any]) -> str:
    """The likely intended keys, not all ~150 of them: close spellings, else the section's keys, else the sections."""
    sections = sorted({k.split(".")[0] for k in known if "." in k})
    close = difflib.get_close_matches(key, [*known, *sections], n=3, cutoff=0.75)
    if close:
        return f"did you mean {' or '.join(close)}?"
    section = key.split(".")[0]
    in_section = sorted(k for k in known if k.split(".")[0] == section and "." in k)
    if in_section:
        return f"keys in '{section}': {', '.join(in_section)}"
    return (f"sections: {', '.join(sections)}; "
            f"top-level keys: {', '.join(sorted(k for k in known if '.' not in k))}")


def parse_blocks(spec: str) -> int | list[int]:
    """'2' -> last two blocks; '4,8,11' -> those (0-based) block indices."""
    try:
        parts = [int(p) for p in str(spec).split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"teacher.blocks must be 'N' or 'i,j,k', got '{spec}'") from None
    if not parts or min(parts) < 0 or (len(parts) == 1 and parts[0] == 0):
        raise ConfigError(f"teacher.blocks must be 'N' or 'i,j,k', got '{spec}'")
    return parts[0] if len(parts) == 1 and "," not in str(spec) else parts


def describe_blocks(spec: str) -> str:
    """A teacher.blocks setting as a reader takes it: '3,' is block 3, not the last three."""
    try:
        parsed = parse_blocks(spec)
    except ConfigError:
        return str(spec)
    if isinstance(parsed, int):
        return f"last {parsed} block{'s' if parsed > 1 else ''}"
    return f"block{'s' if len(parsed) > 1 else ''} {', '.join(map(str, parsed))}"


class StudentConfig(_Section):
    arch: str = "resnet18"
    head_hidden: int = Field(4096, ge=1)


class TrainConfig(_Section):
    batch_size: int = Field(32, ge=1)
    local_steps: int = Field(20, ge=1, description="optimiser steps per site per round")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    mixup: bool = True
    augment: bool = True
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels_last memory format; auto = on CUDA for convolutional students")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile student and live teacher (eager if compiling fails); auto = on CUDA")
    num_workers: int | Literal["auto"] = Field(
        "auto", description="data-loading worker processes; auto = on CUDA one per CPU of the process's share "
        "(affinity, OMP_NUM_THREADS) but one, at most 8, pinned memory; 0 on CPU")
    target_views: int = Field(
        0, ge=0, description="K cached teacher targets per image (seeded views, fp16 memmap); 0 = live teacher")
    target_cache_dir: str = Field("", description="site-local folder of the target cache (empty = $FEDUS_CACHE/targets)")
    cache_on_device: Literal["auto", "on", "off"] = Field(
        "auto", description="hold a filled target cache's views and tokens on the device for the round (no loader "
        "workers); auto = on CUDA when they take at most a quarter of its free memory")
    fused_optimizer: bool = Field(
        True, description="fused AdamW (one kernel per step) where torch has it for the device and dtype; else the default")


class MaskedConsistencyConfig(_Section):
    """TinyUSFM-style: spatial + frequency views, teacher-consistency weights, stages, MIM decoder."""

    mask_ratio: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of patches masked in the spatial view")
    patch_size: int = Field(16, ge=1, description="mask patch side at 224 px; scaled to data.image-size")
    band_low: float = Field(0.25, ge=0.0, description="band-stop inner radius (1 = Nyquist on an axis)")
    band_high: float = Field(0.6, gt=0.0, description="band-stop outer radius")
    stages: int = Field(3, ge=1, description="teacher stages, evenly spaced over its depth; the last is the token grid")
    consistency: Literal["token", "sample"] = "token"
    weight_temperature: float = Field(0.1, gt=0.0, description="softmax temperature turning consistency into weights")
    lambda_rec: float = Field(0.5, ge=0.0, description="weight of the masked-pixel reconstruction (MIM) term")
    decoder_hidden: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _band_is_an_annulus(self) -> "MaskedConsistencyConfig":
        if self.band_high <= self.band_low:
            raise ValueError("band-high must be above band-low")
        return self


class RepulsiveKdConfig(_Section):
    """MobileFetalCLIP's selective repulsive KD between two views (image-only form)."""

    tau: float = Field(5.0, gt=0.0, description="teacher-only softening temperature")
    teacher_logit_scale: float = Field(100.0, gt=0.0, description="CLIP-style scale of the teacher's cosines before /tau")
    max_logit_scale: float = Field(100.0, gt=0.0, description="clamp of the student's learnable logit scale")
    beta_start: float = 2.0
    beta_end: float = -0.8
    q_floor: float = Field(1e-4, gt=0.0, lt=1.0, description="floor on Q in L_off: bounds the repulsive (beta < 0) regime")
    base_weight: float = Field(1.0, ge=0.0, description="token-MSE base term on view 1 (ignored when distill.loss lists token-mse)")


class DistillConfig(_Section):
    loss: str = Field("token-mse", description="'name' or 'name:w,name:w' over token-mse, masked-consistency, repulsive-kd")
    masked_consistency: MaskedConsistencyConfig = MaskedConsistencyConfig()
    repulsive_kd: RepulsiveKdConfig = RepulsiveKdConfig()


class FederationConfig(_Section):
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_sites: int = Field(1, ge=1, description="sites that must be connected before the first round")
    quorum: int = Field(0, ge=0, description="replies a later round needs to be aggregated (0 = min-sites)")
    round_timeout: float = Field(3600.0, gt=0, description="seconds a round waits for replies; late ones are dropped")
    straggler_wait: float = Field(
        0.0, ge=0, description="seconds a round still waits once a quorum answered (0 = until round-timeout)")
    robust: Literal["none", "trimmed-mean", "median"] = Field(
        "none", description="aggregation: example-weighted FedAvg, or Flower's coordinate-wise trimmed mean / median")
    trim_beta: float = Field(0.2, ge=0, lt=0.5, description="fraction cut at each end by robust = trimmed-mean")
    evaluate_every: int = Field(
        1, ge=1, description="federated evaluation every N rounds (round 0 and the last always); evaluated apart "
        "(evaluate-with-train off), each is one more ClientApp start and student download per site")
    evaluate_with_train: bool = Field(
        True, description="a round's global student is evaluated by the next round's train message, before the site "
        "trains (one ClientApp start and one download per site per round instead of two); the last round's has its "
        "own. Separate evaluate messages under secure aggregation or fraction-train < 1")
    max_norm_ratio: float = Field(
        10.0, ge=0, description="reject an update whose norm exceeds this x the round's median (>= 3 sites; 0 = off)")
    transfer_dtype: Literal["fp16", "bf16", "fp32", "int8-delta"] = Field(
        "fp16", description="students on the wire, both ways (cast back to fp32 on arrival; aggregate in fp32); "
        "int8-delta: fp16 down, int8 update + scales up, with error feedback at the site (fedus/transfer.py)")
    server_optimizer: Literal["none", "fedadam", "fedyogi", "fedadagrad", "fedavgm"] = Field(
        "none", description="Flower's server step on the aggregate's update (state checkpointed per round); none = FedAvg")
    server_lr: float = Field(
        0.0, ge=0, description="eta (fedavgm: server_learning_rate); 0 = Flower's default: 0.1, fedyogi 0.01, fedavgm 1.0")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="fedavgm's server_momentum")
    beta_1: float = Field(0.9, ge=0, lt=1, description="fedadam / fedyogi first-moment decay")
    beta_2: float = Field(0.99, ge=0, lt=1, description="fedadam / fedyogi second-moment decay")
    tau: float = Field(1e-3, gt=0, description="fedadam / fedyogi / fedadagrad adaptivity (added to sqrt(v))")

    @model_validator(mode="after")
    def _momentum_is_fedavgm(self) -> "FederationConfig":
        if self.server_momentum and self.server_optimizer != "fedavgm":
            raise ValueError("server-momentum applies to server-optimizer = 'fedavgm' (fedadam / fedyogi use beta-1)")
        return self


class PrivacyConfig(_Section):
    """Sample-level DP-SGD at each site (Opacus); the budget is enforced by the site's own ledger."""

    enabled: bool = False
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample clipping norm")
    noise_multiplier: float = Field(1.0, ge=0, description="0 = derive it per round from target-epsilon")
    target_epsilon: float = Field(0.0, ge=0, description="epsilon one round alone may spend (with noise-multiplier = 0)")
    delta: float = Field(0.0, ge=0, lt=1, description="0 = 1 / (10 x the site's training images)")
    accountant: Literal["rdp", "prv"] = "rdp"
    clipping: Literal["ghost", "per-sample"] = Field(
        "ghost", description="how per-sample clipping is computed (same result): 'ghost' = per-sample gradient norms "
        "only and the clipped gradient in the same backward pass (fast); 'per-sample' = Opacus' hooks store every "
        "per-sample gradient")
    epsilon_budget: float = Field(
        8.0, ge=0, description="simulation default only: a deployed site sets its own (node config 'epsilon-budget')")
    ledger_dir: str = Field("", description="simulation: folder of per-site ledgers (empty = <run-dir>/privacy-ledgers)")

    @model_validator(mode="after")
    def _noise_or_target(self) -> "PrivacyConfig":
        if self.enabled and self.noise_multiplier == 0 and self.target_epsilon == 0:
            raise ValueError("set noise-multiplier > 0 or target-epsilon > 0")
        return self


class CentralDPConfig(_Section):
    """Client-level DP on the aggregate (server/central_dp.py): each site's update clipped to a norm
    (at the server, or at the site before it leaves), the uniform mean noised, epsilon from Flower's RDP
    accountant. Protects each site's whole contribution; sample-level DP-SGD is `privacy`. The norm is
    fixed, or (`*-adaptive`, Andrew et al. 2021) moved each round towards a quantile of the sites' norms."""

    mode: Literal["off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive"] = "off"
    clipping_norm: float = Field(1.0, gt=0, description="fixed modes: L2 bound of one site's float update")
    noise_multiplier: float = Field(
        1.0, gt=0, description="noise std = noise-multiplier x clipping-norm / sampled-sites; adaptive modes: the "
        "total multiplier of update and clipped count together (the update gets more, Andrew et al. Thm 1)")
    sampled_sites: int = Field(0, ge=0, description="sites per round the noise is calibrated for (0 = federation.min-sites)")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta at which epsilon is reported")
    initial_clipping_norm: float = Field(0.1, gt=0, description="adaptive modes: the clipping norm of round 1")
    target_quantile: float = Field(
        0.5, ge=0, le=1, description="adaptive modes: fraction of sites whose update norm should be within the norm")
    clip_norm_lr: float = Field(0.2, gt=0, description="adaptive modes: geometric step of the norm per round")
    clipped_count_stddev: float = Field(
        0.0, ge=0, description="adaptive modes: noise std on the count of unclipped sites (0 = sampled-sites / 20)")

    @property
    def adaptive(self) -> bool:
        return self.mode in ("server-adaptive", "client-adaptive")

    def count_stddev(self, sites: int) -> float:
        return self.clipped_count_stddev or sites / 20  # Andrew et al.'s (and Flower's) default

    def update_noise_multiplier(self, sites: int) -> float:
        """The multiplier of the update's noise. Adaptive modes also release a noised count, so the update
        gets z_u = (z^-2 - (2 sigma_b)^-2)^-1/2: both together are one Gaussian mechanism of multiplier z
        (Andrew et al. 2021, Thm 1), which is what the accountant is told."""
        z = self.noise_multiplier
        if not self.adaptive:
            return z
        sigma_b = self.count_stddev(sites)
        if z >= 2 * sigma_b:
            default = "" if self.clipped_count_stddev else f", the default {sites} sites / 20"
            raise ValueError(
                f"central-dp.noise-multiplier ({z:g}) must be below 2 x clipped-count-stddev ({sigma_b:g}{default}): "
                "the clipped count would spend the whole budget; set a larger central-dp.clipped-count-stddev")
        return (z ** -2 - (2 * sigma_b) ** -2) ** -0.5


class SecureAggregationConfig(_Section):
    """SecAgg+ (Flower's SecAggPlusWorkflow; server/secure_aggregation.py): each site sends its update
    quantised and masked, the server can unmask only the sum of at least `reconstruction-threshold`
    sites, never one site's update. So what needs one site's update cannot run at the server: robust
    aggregation, update validation (`federation.max-norm-ratio`) and server-side or adaptive central DP
    are refused or skipped. Central DP `client-fixed` works: sites clip and weigh 1, the server noises the mean."""

    enabled: bool = False
    num_shares: float = Field(
        1.0, gt=0, description="key shares per site: a fraction of the sampled sites (<= 1) or a count (> 2)")
    reconstruction_threshold: float = Field(
        0.67, gt=0, description="shares needed to unmask a dropped site: a fraction of num-shares (<= 1) or a count")
    clipping_range: float = Field(
        4.0, gt=0, description="bound of each coordinate of a site's weighted update (update x weight / max-weight) "
        "before quantisation; coordinates beyond it are clipped, and each site reports the fraction clipped")
    quantization_bits: int = Field(
        24, ge=8, le=30, description="quantisation levels = 2^bits; masks are mod 2^32, so at most 2^(32-bits) sites a round")
    max_weight: float = Field(
        0.0, ge=0, description="the largest site weight (training images) expected; 0 = the largest of the sites "
        "that answered round 0. A smaller value than a site's weight clips it; a much larger one costs precision")

    def count(self, value: float) -> int | float:
        """Flower's convention: a float <= 1 is a fraction, a larger whole number a count."""
        return int(value) if value > 1 else float(value)


class CoresetConfig(_Section):
    """Federated coreset selection (fedus.coreset): sites train on their best-scored images; only
    score histograms and counts leave a site, the server turns them into one global budget."""

    enabled: bool = False
    budget: float = Field(0.2, gt=0.0, le=1.0, description="fraction of all sites' training images kept")
    rescore_every: int = Field(5, ge=1, description="re-score and re-select in rounds 1, 1+R, 1+2R, ...")
    warmup_steps: int = Field(3, ge=0, description="student steps over which per-image gradient norms are tracked")
    clusters: int = Field(8, ge=1, description="k-means clusters of the teacher's embeddings, per site")
    feature_weight: float = Field(1.0, ge=0.0, description="weight of the feature rank in the fused score")
    quality_weight: float = Field(1.0, ge=0.0, description="weight of the gradient (quality) rank in the fused score")
    quota: float = Field(0.5, ge=0.0, le=1.0, description="share of a site's kept images spread over its clusters by size")
    prefer: Literal["representative", "hard"] = Field(
        "representative", description="representative: near the cluster centre, small gradient (easy "
        "prototypes; keeps junk out); hard: far from it, large gradient (what the student has not learnt yet; "
        "re-scored every round it beats a random subset on curated data, see README); both drop copies, lone "
        "and noisy images")
    duplicate_ratio: float = Field(
        0.25, ge=0.0, description="closer than this x the site's median distance to its duplicate-neighbours-th "
        "nearest neighbour = a duplicate (0 = off)")
    duplicate_neighbours: int = Field(
        10, ge=1, description="the reference neighbour of duplicate-ratio; above the frames of the longest cine clip")
    bins: int = Field(32, ge=2, le=64, description="fixed histogram bins over [0, 1]: what a site sends")
    min_bin_count: int = Field(
        5, ge=0, description="small-cell suppression: bins of 1..k-1 images are merged before sending (0 = off)")

    @model_validator(mode="after")
    def _some_weight(self) -> "CoresetConfig":
        if self.feature_weight + self.quality_weight <= 0:
            raise ValueError("feature-weight + quality-weight must be > 0")
        return self


class EvalConfig(_Section):
    batch_size: int = Field(64, ge=1)
    probe_rounds: str = Field("first,last", description="'first,last', 'all' or '0,5,10'")
    seg_probe_steps: int = Field(150, ge=1, description="decoder steps of the per-round segmentation probe")
    label_fractions: str = Field("0.05,0.1,0.2,0.5,1.0", description="train-label fractions of the protocol (fedus evaluate)")
    seeds: int = Field(3, ge=1, description="subsets/heads per label fraction (mean +- std)")
    knn_k: int = Field(10, ge=1)
    decoder_stages: int = Field(3, ge=1, description="encoder stages fed to the segmentation decoder")
    decoder_width: int = Field(32, ge=4)
    decoder_steps: int = Field(200, ge=1)
    embedding_per_site: int = Field(100, ge=0, description="held-out images per site in the t-SNE picture (0 = none)")
    finetune: bool = Field(False, description="also fine-tune each encoder end to end (cls-ft / seg-ft rows); slow")
    finetune_steps: int = Field(100, ge=1, description="steps per fine-tuning run (one per model, task, fraction, seed)")
    finetune_lr: float = Field(1e-4, gt=0, description="encoder learning rate when fine-tuning (heads: 10x)")
    protocol_at: Literal["offline", "last"] = Field(
        "offline", description="full protocol (label fractions x seeds) only via `fedus evaluate`, or also in the last round's evaluate")

    @model_validator(mode="after")
    def _fractions_parse(self) -> "EvalConfig":
        from fedus.evaluation.fractions import parse_fractions

        parse_fractions(self.label_fractions)
        return self


class RunConfig(_Section):
    rounds: int = Field(3, ge=1)
    seed: int = 0
    run_dir: str = ""
    resume: bool = Field(False, description="continue the run in run-dir from its last completed round")
    scenario: str = "custom"
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    distill: DistillConfig = DistillConfig()
    federation: FederationConfig = FederationConfig()
    eval: EvalConfig = EvalConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    coreset: CoresetConfig = CoresetConfig()
    central_dp: CentralDPConfig = CentralDPConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()

    @model_validator(mode="after")
    def _target_cache_fits(self) -> "RunConfig":
        if self.train.target_views:
            names = {part.split(":")[0].strip() for part in self.distill.loss.split(",")}
            if names != {"token-mse"} or self.privacy.enabled:
                raise ValueError("train.target-views (cached teacher targets) works with distill.loss = 'token-mse' "
                                 "only, without privacy; set train.target-views = 0")
        if self.coreset.enabled and self.privacy.enabled:  # scoring reads every image outside DP-SGD's accounting
            raise ValueError("coreset.enabled does not combine with privacy.enabled (scoring is not DP-accounted)")
        if self.central_dp.mode != "off" and self.federation.robust != "none":
            raise ValueError("central-dp needs the uniform mean: set federation.robust = 'none'")
        if self.central_dp.mode != "off" and self.federation.transfer_dtype == "int8-delta":
            # error feedback carries clipped-away rounding into later rounds: a sent update could exceed C
            raise ValueError("central-dp needs each update within its clipping norm, which int8-delta's error "
                             "feedback does not keep: set federation.transfer-dtype = 'fp16'")
        if self.secure_aggregation.enabled:  # the server holds only the sum: nothing per site can run there
            if self.federation.robust != "none":
                raise ValueError("secure-aggregation gives the server only the sum of the updates: set federation.robust = 'none'")
            if self.central_dp.mode not in ("off", "client-fixed"):  # the others clip or count at the server
                raise ValueError("secure-aggregation combines with central-dp.mode = 'client-fixed' only (sites clip, "
                                 "the server noises the sum); set that or 'off'")
            if self.federation.transfer_dtype not in ("fp16", "fp32"):  # the legacy path carries numpy arrays
                raise ValueError("secure-aggregation quantises the update itself and sends numpy arrays: "
                                 "set federation.transfer-dtype = 'fp16' or 'fp32'")
        self.central_dp.update_noise_multiplier(self.central_dp.sampled_sites or self.federation.min_sites)
        return self

    # --- construction -------------------------------------------------------
    @classmethod
    def from_dict(cls, nested: dict[str, Any]) -> "RunConfig":
        try:
            return cls.model_validate(nested)
        except ValidationError as err:
            raise ConfigError(_one_line(err)) from None

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(read_toml(path).get("run", {}))

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "RunConfig":
        """From Flower's `context.run_config` (dotted kebab keys)."""
        return cls.from_dict(unflatten(flat))

    # --- export ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)

    def to_flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "RunConfig":
        """Apply `section.key=value` overrides (TOML values; bare words are strings)."""
        flat = self.to_flat()
        items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
        for key, value in items:
            key = _kebab(key)
            if key not in flat:
                raise ConfigError(f"unknown config key '{key}' ({_key_hint(key, flat)})")
            flat[key] = value
        return RunConfig.from_flat(flat)

    def probe_at(self, server_round: int) -> bool:
        """Whether the frozen-feature probes run at this round (they are the slow part)."""
        spec = self.eval.probe_rounds.replace(" ", "")
        if spec == "all":
            return True
        wanted = set(spec.split(","))
        return (
            ("first" in wanted and server_round == 0)
            or ("last" in wanted and server_round == self.rounds)
            or str(server_round) in wanted
        )


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from None


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare word, e.g. teacher.arch=resnet50
    return key, value


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":  # a misspelt key in a TOML file
        return f"unknown config key '{where}' ({_key_hint(where, RunConfig().to_flat())}){more}"
    return f"invalid config value for '{where}': {first['msg']}{more}"
