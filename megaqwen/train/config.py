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


@dataclass
class TrainConfig:
    steps: int = 30
    """Optimizer steps to run in total (a resumed run continues up to this number)."""
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
    resume: bool = True
    """Resume from the latest checkpoint in out_dir when there is one."""
    init_from: str | None = None
    """Start from these weights (native checkpoint or HF folder) when there is nothing to resume;
    the model config must match the checkpoint's."""
    exit_at_step: int = 0
    """Save and stop once this step is done, as a preempted job would (Megatron's --exit-interval);
    0 never. A rerun of the same command resumes from there."""
    log_every: int = 1
    """Console progress line every N steps (metrics.jsonl gets every step)."""
    engine: str = "native"
    """native (our optimizer + DP wrappers) | deepspeed."""
    peak_flops: float = 0.0
    """Device peak FLOP/s for MFU; 0 looks the device up in a table (no MFU on CPU)."""


@dataclass
class DataConfig:
    path: str = "sample"
    """A shard prefix (.bin/.idx without extension), a blend recipe (.json), or `sample`: the
    corpus shipped in data_pipeline/samples, tokenised into out_dir/data on first use."""
    reset_position_ids: bool = True
    """Restart RoPE positions at each document boundary inside a packed sample."""
    document_mask: bool = True
    """Mask attention across document boundaries inside a packed sample."""


@dataclass
class WandbConfig:
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
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        t = self.train
        self.model.validate()
        for name in ("steps", "seq_len", "global_batch_size", "micro_batch_size"):
            if getattr(t, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(t, name)}")
        if t.global_batch_size % t.micro_batch_size:
            raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                             f"train.micro_batch_size={t.micro_batch_size}")
        if t.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"train.schedule={t.schedule!r}; choose cosine | wsd | constant")
        if not 0 <= t.min_lr <= t.lr:
            raise ValueError(f"need 0 <= train.min_lr ({t.min_lr}) <= train.lr ({t.lr})")
        if not 0 < t.decay_fraction <= 1:
            raise ValueError(f"train.decay_fraction must be in (0, 1], got {t.decay_fraction}")
        if t.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.dtype={t.dtype!r}; choose auto | fp32 | bf16")
        if t.engine not in ("native", "deepspeed"):
            raise ValueError(f"train.engine={t.engine!r}; choose native | deepspeed")
        if self.logger.wandb.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.wandb.mode={self.logger.wandb.mode!r}; "
                             "choose offline | online | disabled")


def register_configs() -> None:
    ConfigStore.instance().store(name="megaqwen_schema", node=Config)
