"""Typed configuration of a training run, registered in Hydra's ConfigStore.

`conf/config.yaml` starts from the `megaqwen_schema` node stored here, so every YAML file and every
command-line override is type-checked against these dataclasses; cross-field checks run once in
`Config.validate()` before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from megaqwen.kernels.registry import KernelConfig
from megaqwen.models.config import ModelConfig
from megaqwen.parallel.config import ParallelConfig
from megaqwen.suggest import check_choice
from megaqwen.train.fp8 import FP8_RECIPES
from megaqwen.train.grpo import GRPOConfig
from megaqwen.train.objectives import DPOConfig, objective_for
from megaqwen.train.rollout_config import RolloutConfig, check_rollout

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("native", "deepspeed")
NONFINITE_POLICIES = ("stop", "skip", "rollback")
BAD_CHECKPOINT_POLICIES = ("fallback", "stop")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class TrainConfig:
    """Optimizer, schedule, precision, checkpoints, validation and the run folder."""

    steps: int = 30
    """Optimizer steps to run in total (a resumed run continues up to this number)."""
    epochs: int = 0
    """Passes over the training data, each with its own shuffle (SFT/DPO); 0: the data repeats as
    long as train.steps needs. With N > 0, train.steps x global_batch_size samples must fit in N
    passes (pre-flight refuses more and names the largest train.steps that fits)."""
    seq_len: int = 128
    """Tokens per sample."""
    global_batch_size: int = 8
    """Samples per optimizer step, summed over data-parallel ranks and accumulation micro-steps."""
    micro_batch_size: int = 2
    """Samples per forward/backward on one rank; accumulation = global / (micro * dp)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    schedule: str = "cosine"
    """cosine (warmup + cosine decay) | wsd (warmup-stable-decay) | constant (after warmup)."""
    warmup_steps: int = 5
    """Linear warmup from 0 to lr over this many steps."""
    decay_fraction: float = 0.2
    """WSD only: fraction of `steps` spent in the final linear decay to min_lr."""
    schedule_start: int = 0
    """Step at which the LR schedule (warmup, decay) starts; a context-extension stage that resumes a
    run sets it to its first step so the stage has its own warmup and decay."""
    weight_decay: float = 0.1
    """Decoupled (AdamW) weight decay on matrices; biases and norm weights are never decayed."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max global L2 norm of gradients; 0 disables clipping (the norm is still logged)."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 autocast on CUDA with bf16 support, else fp32) | fp32 | bf16."""
    fp8: str = "none"
    """FP8 linears (compute only; checkpoints keep the master dtype): none | tensorwise | rowwise
    (torchao float8, dynamic per-tensor / per-row scales; CPU too) | blockwise (CUDA sm90+) | mxfp8
    (CUDA sm100); with parallel.tp_linear_backend=te: Transformer Engine's recipe of that name."""
    fp8_skip_first_last: bool = True
    """Keep the first and last decoder layer's linears out of FP8 (embedding and LM head always are)."""
    fp8_skip_modules: list[str] = field(default_factory=lambda: ["mlp.gate"])
    """Module FQN suffixes kept out of FP8 (whole dotted components; default: the MoE routers)."""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda."""
    seed: int = 1234
    """Seed for init and for the data order."""
    out_dir: str = "runs/debug"
    """Run folder: checkpoints, metrics.jsonl, resolved config, W&B files."""
    save_every: int = 10
    """Save a checkpoint every N steps (and at the last step); 0 disables periodic saves."""
    keep_last: int = 3
    """Checkpoints to keep on disk (oldest deleted first); 0 keeps all."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (milestones); 0: none."""
    async_save: bool = False
    """Write checkpoints in the background (DCP async_save): training waits only for a copy of the
    state to host memory; the checkpoint becomes `latest` once every rank's write is done.
    Costs one extra host copy of this rank's weights and optimizer state."""
    resume: bool = True
    """Resume from the latest checkpoint in out_dir when there is one."""
    on_bad_checkpoint: str = "fallback"
    """A resumed checkpoint whose files fail their recorded sizes/CRCs: fallback (warn, resume from the
    newest earlier checkpoint that passes) | stop (one-line error naming folder and file)."""
    init_from: str | None = None
    """Start from these weights (native checkpoint or HF folder) when there is nothing to resume;
    the model config must match the checkpoint's."""
    exit_at_step: int = 0
    """Save and stop once this step is done, as a preempted job would (Megatron's --exit-interval);
    0 never. A rerun of the same command resumes from there."""
    log_every: int = 1
    """Console progress line every N steps (metrics.jsonl gets every step)."""
    on_nonfinite: str = "stop"
    """A NaN/Inf loss or gradient norm, checked before the optimizer step: stop (error naming the
    step; the weights are untouched) | skip (drop this step's update, count it in skipped_steps) |
    rollback (reload weights and optimizer state from the latest checkpoint and go on with the next
    batches). Native engine; DeepSpeed steps inside its engine and always stops."""
    spike_factor: float = 0.0
    """Loss-spike detection: a step whose loss exceeds this many times the mean of the previous 20
    is logged as a spike (warning, `loss_spike` metric); 0 disables."""
    inject_nan_at_step: int = 0
    """Fault injection for tests and drills: make step N's loss NaN (0 never)."""
    engine: str = "native"
    """native (our optimizer + DP wrappers) | deepspeed."""
    objective: str = "lm"
    """What the step minimises (megaqwen/train/objective.py): lm = next-token cross-entropy over every
    valid label (pretraining); post-training objectives register their own names; `package.module:NAME`
    imports a user's `Objective`."""
    reference_from: str | None = None
    """Weights of the frozen reference model an objective may need (HF folder or native checkpoint);
    default: train.init_from."""
    peak_flops: float = 0.0
    """Device peak FLOP/s for MFU; 0 looks the device up in a table (no MFU on CPU)."""
    eval_every: int = 0
    """Validation loss every N steps and at the last step, on data.valid_path or the held-out split
    (data.valid_fraction); 0 disables."""
    eval_iters: int = 4
    """Global batches (global_batch_size samples each) per validation; the same samples every time."""
    allow_changes: list[str] = field(default_factory=list)
    """Resume-contract keys this run may change from the checkpoint it resumes, e.g.
    [train.seq_len,model.rope_theta,data.path] for a context-extension stage; a section name
    (data, model, parallel) allows all of its keys. Any other difference stops the run."""
    lock_timeout_min: float = 60.0
    """A run-folder lock whose holder runs on another host counts as abandoned after this many
    minutes without a refresh (the holder refreshes it every step); same-host holders are checked
    by process id."""
    fit_check: bool = True
    """Refuse at start-up a run whose memory estimate per process (model state, activations, working
    margin) exceeds 90% of the memory it may use (megaqwen/train/fit_check.py); false skips the check."""
    memory_limit_gb: float = 0.0
    """Memory one process may use, GiB, for the fit check (its GPU, or its share of RAM on CPU); 0
    detects it (free GPU memory; or available RAM within any cgroup limit, over this node's processes)."""


@dataclass
class DataConfig:
    """Training and held-out data: shards or a blend recipe, and how samples are packed."""

    path: str = "sample"
    """A shard prefix (.bin/.idx without extension), a blend recipe (.json), or `sample`: the
    corpus shipped in data_pipeline/samples, tokenised into out_dir/data on first use."""
    reset_position_ids: bool = True
    """Restart RoPE positions at each document boundary inside a packed sample."""
    document_mask: bool = True
    """Mask attention across document boundaries inside a packed sample."""
    valid_path: str | None = None
    """Held-out shard prefix or blend recipe for the validation loss; None uses the held-out split."""
    valid_fraction: float = 0.0
    """Fraction of each shard's documents held out of training for validation (whole documents, by a
    fixed hash: train.seed does not move them); 0 holds out nothing."""
    index_cache: str = "auto"
    """Folder where the sample indexes are built once and memory-mapped by every rank; auto: an
    index-cache/ folder beside the data (set a writable folder for read-only data); off: each rank
    builds them in its own memory."""
    index_cache_shared: bool = True
    """The index cache folder is on a filesystem all nodes see (rank 0 builds); false: node-local
    (local rank 0 of each node builds). Other ranks wait for it."""
    index_cache_timeout_s: float = 3600.0
    """Seconds a rank waits for the index cache built by another rank before failing."""
    num_workers: int = 1
    """Worker processes that read and stack the next micro-batches while the step runs; 0 reads them
    in the training process."""
    prefetch: int = 2
    """Micro-batches each data worker reads ahead."""


@dataclass
class ProfileConfig:
    """A torch.profiler trace of chosen steps and a CUDA memory snapshot, on request."""

    start_step: int = 0
    """First step (1-based) traced with torch.profiler into out_dir/profile/; 0 disables."""
    num_steps: int = 2
    """Steps traced from start_step on."""
    memory_snapshot: bool = False
    """CUDA only: record allocator history over the traced steps and dump a snapshot pickle
    (view it at pytorch.org/memory_viz)."""


@dataclass
class WandbConfig:
    """Weights & Biases logging (rank 0 only)."""

    enabled: bool = True
    """Log to Weights & Biases (rank 0 only)."""
    mode: str = "offline"
    """offline (default; sync later with `wandb sync`) | online | disabled."""
    project: str = "megaqwen"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team); None uses the account default."""
    name: str | None = None
    """Run name; None uses the out_dir's folder name."""


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl."""

    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    """A whole training run: one section per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    def validate(self) -> None:
        t = self.train
        self.model.validate()
        for name in ("steps", "seq_len", "global_batch_size", "micro_batch_size"):
            if getattr(t, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(t, name)}")
        if t.epochs < 0:
            raise ValueError(f"train.epochs must be >= 0 (0: no limit), got {t.epochs}")
        if t.global_batch_size % t.micro_batch_size:
            raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                             f"train.micro_batch_size={t.micro_batch_size}")
        check_choice("train.schedule", t.schedule, SCHEDULES)
        if not 0 <= t.min_lr <= t.lr:
            raise ValueError(f"need 0 <= train.min_lr ({t.min_lr}) <= train.lr ({t.lr})")
        if not 0 <= t.schedule_start < t.steps:
            raise ValueError(f"train.schedule_start={t.schedule_start} must be in [0, train.steps={t.steps})")
        if not 0 < t.decay_fraction <= 1:
            raise ValueError(f"train.decay_fraction must be in (0, 1], got {t.decay_fraction}")
        check_choice("train.dtype", t.dtype, DTYPES)
        check_choice("train.fp8", t.fp8, FP8_RECIPES)
        check_choice("train.device", t.device, DEVICES)
        check_choice("train.on_nonfinite", t.on_nonfinite, NONFINITE_POLICIES)
        check_choice("train.on_bad_checkpoint", t.on_bad_checkpoint, BAD_CHECKPOINT_POLICIES)
        if t.spike_factor < 0 or 0 < t.spike_factor <= 1:
            raise ValueError(f"train.spike_factor={t.spike_factor} must be 0 (off) or > 1")
        check_choice("train.engine", t.engine, ENGINES)
        objective_for(self)  # the objective exists and its section (dpo.*, grpo.*) fits the run
        if t.objective == "grpo":
            check_rollout(self)  # rollout.*: prompts, engine, sampling, the batch in whole groups
        check_choice("logger.wandb.mode", self.logger.wandb.mode, WANDB_MODES)
        if t.seq_len > self.model.max_position_embeddings:
            # an error, not a warning: the HF export writes max_position_embeddings into config.json,
            # so a model trained on longer samples would be published as unable to use them
            raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings="
                             f"{self.model.max_position_embeddings}; raise model.max_position_embeddings "
                             "(a context-extension stage) or shorten train.seq_len")
        for name in ("eval_every", "eval_iters"):
            if getattr(t, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(t, name)}")
        if t.eval_every and t.eval_iters == 0:
            raise ValueError(f"train.eval_every={t.eval_every} needs train.eval_iters >= 1")
        d = self.data
        if d.num_workers < 0 or d.prefetch < 1 or d.index_cache_timeout_s <= 0:
            raise ValueError(f"need data.num_workers >= 0, data.prefetch >= 1 and data.index_cache_timeout_s "
                             f"> 0; got {d.num_workers}, {d.prefetch}, {d.index_cache_timeout_s}")
        if not 0 <= self.data.valid_fraction < 1:
            raise ValueError(f"data.valid_fraction must be in [0, 1), got {self.data.valid_fraction}")
        if t.eval_every and self.data.valid_path is None and self.data.valid_fraction == 0:
            raise ValueError(f"train.eval_every={t.eval_every} needs held-out data: set data.valid_path "
                             "(a shard prefix or recipe) or data.valid_fraction (e.g. 0.01)")
        p = self.profile
        if p.start_step < 0 or p.num_steps < 1:
            raise ValueError(f"need profile.start_step >= 0 and profile.num_steps >= 1, got "
                             f"{p.start_step} and {p.num_steps}")
        if t.lock_timeout_min <= 0:
            raise ValueError(f"train.lock_timeout_min must be positive, got {t.lock_timeout_min}")
        if not t.memory_limit_gb >= 0:
            raise ValueError(f"train.memory_limit_gb must be >= 0 (0 detects), got {t.memory_limit_gb}")
        if not self.parallel.collective_timeout_s > 0:
            raise ValueError(f"parallel.collective_timeout_s must be positive, got "
                             f"{self.parallel.collective_timeout_s}")


def register_configs() -> None:
    ConfigStore.instance().store(name="megaqwen_schema", node=Config)
