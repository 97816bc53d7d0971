"""Training nested sparse models (Grimaldi et al., "Dynamic ConvNets on Tiny Devices via Nested Sparsity").

Every step trains the levels jointly: the loss is the sum over levels (all of them, or a sample that
always holds the densest and the sparsest), optionally with in-place distillation from the densest
level to the sparser ones. A weight is updated only by the levels that contain it: the forward pass
uses ``W * (LM >= l)``, so autograd gives level ``l`` no gradient for weights it masks. Weights pruned
at every level (``LM == -1``) stay exactly zero: :class:`PrunedStayZero` masks their gradients and,
after every optimizer step, zeroes them and their optimizer state (momentum, Adam moments), so
weight decay and momentum cannot move them. A :class:`ProgressiveSchedule` prunes gradually, the
densest level first, recomputing the level maps by magnitude from the current weights.

Export to the canonical forms: :func:`export_torch` (``torch.export`` with ``level`` a 0-d int64
tensor, what ``tvm_nested.from_torch`` takes) and :func:`export_onnx` (opset 17, input ``level``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .nn import NestedModel
from .pruning import PruningConfig, update_levelmaps_

# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The defaults are the digits experiment's (``examples/digits.json``)."""

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) | "adamw"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # "cosine" | "constant"
    levels: str | int = "all"  # levels per step: "all", or k sampled (densest and sparsest always in)
    distill: float = 0.0  # weight of in-place distillation (KL to the densest level) for sparser levels
    temperature: float = 2.0
    prune_start: float = 0.0  # epoch at which progressive pruning starts
    ramp_epochs: float = 4.0  # epochs each level's density ramps over (densest level first); 0: one shot
    prune_every: int = 10  # steps between level-map updates during the ramps
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if not (self.levels == "all" or (isinstance(self.levels, int) and self.levels >= 1)):
            raise ValueError(f"levels must be 'all' or a positive int, got {self.levels!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must be in [0, 1], got {self.distill!r}")


# --------------------------------------------------------------------------- progressive schedule


@dataclass(frozen=True)
class ProgressiveSchedule:
    """Densities per level at step ``t``: level 0 ramps first, then level 1 from level 0's target, ...

    Level ``l`` ramps (cubic, Zhu & Gupta) over ``[start + l*ramp, start + (l+1)*ramp)`` from level
    ``l-1``'s target (1.0 for level 0) down to its own target; before that it follows level ``l-1``
    (nesting holds at every step). ``ramp == 0`` prunes every level at ``start`` in one shot.
    """

    targets: tuple[float, ...]
    start: int
    ramp: int

    def densities(self, step: int) -> list[float]:
        out, upper = [], 1.0
        for lvl, target in enumerate(self.targets):
            begin = self.start + lvl * self.ramp
            if step < begin:
                d = out[-1] if out else 1.0
            elif self.ramp == 0 or step >= begin + self.ramp:
                d = target
            else:
                frac = (step - begin) / self.ramp
                d = target + (upper - target) * (1.0 - frac) ** 3
            out.append(min(d, out[-1]) if out else d)
            upper = target
        return out

    @property
    def end(self) -> int:
        return self.start + len(self.targets) * self.ramp


# --------------------------------------------------------------------------- masking


class PrunedStayZero:
    """Keeps weights pruned at every level (``level_map == -1``) exactly zero.

    Gradient hooks zero their gradients; an optimizer post-step hook zeroes the weights and every
    optimizer state tensor of the weight's shape (momentum buffers, Adam moments). The masks are read
    at call time, so level-map updates of a progressive schedule are honoured. ``remove()`` undoes it.
    """

    def __init__(self, model: NestedModel, optimizer: torch.optim.Optimizer | None = None):
        self.model = model
        self.optimizer = optimizer
        self._handles = []
        for w in model.nested_weights():
            self._handles.append(w.weight.register_hook(lambda g, w=w: g * (w.level_map >= 0).to(g.dtype)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply()))
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights, their gradients and their optimizer state now."""
        for w in self.model.nested_weights():
            weight = w.weight
            keep = (w.level_map >= 0).to(weight.dtype)
            weight.mul_(keep)
            if weight.grad is not None:
                weight.grad.mul_(keep)
            if self.optimizer is not None:
                for v in self.optimizer.state.get(weight, {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == weight.shape:
                        v.mul_(keep)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# --------------------------------------------------------------------------- losses


def pick_levels(num_levels: int, how: str | int, generator: torch.Generator) -> list[int]:
    """Levels trained at one step: all, or ``how`` of them, the densest and sparsest always included."""
    if how == "all" or how >= num_levels:
        return list(range(num_levels))
    if how == 1:
        return [int(torch.randint(num_levels, (1,), generator=generator))]
    middle = torch.randperm(max(num_levels - 2, 0), generator=generator)[: how - 2] + 1
    return sorted({0, num_levels - 1, *(int(i) for i in middle)})


def nested_loss(
    model: NestedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    levels: Sequence[int],
    *,
    distill: float = 0.0,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, dict[int, float]]:
    """Sum over ``levels`` of the cross-entropy; with ``distill > 0`` every level but the densest mixes
    in ``distill`` x KL(softmax(teacher / T) || softmax(student / T)) * T^2, the teacher being the densest
    level of this step, detached (in-place distillation)."""
    total, parts, teacher = 0.0, {}, None
    for lvl in sorted(levels):
        logits = model(x, level=torch.tensor(lvl))
        loss = F.cross_entropy(logits, y)
        if distill > 0 and teacher is not None:
            kd = (
                F.kl_div(
                    F.log_softmax(logits / temperature, -1),
                    F.softmax(teacher / temperature, -1),
                    reduction="batchmean",
                )
                * temperature**2
            )
            loss = (1 - distill) * loss + distill * kd
        if teacher is None:
            teacher = logits.detach()
        parts[lvl] = float(loss.detach())
        total = total + loss
    return total, parts


# --------------------------------------------------------------------------- loops


def progress_bar(total: int, desc: str):
    """The one progress bar (tqdm on stderr, as ``tvm_nested.tune`` shows): steps done of the total,
    the last loss, time left. On a terminal it redraws in place; in a log file it writes a line
    every 10 s."""
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10.0)


def _batches(data, batch_size: int, generator: torch.Generator) -> Iterable:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]
    else:  # any iterable of (x, y) batches, e.g. a DataLoader
        yield from data


def _steps_per_epoch(data, batch_size: int) -> int:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return math.ceil(len(data[0]) / batch_size)
    return len(data)


def _optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    if cfg.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def train_dense(model: nn.Module, data, cfg: TrainConfig, *, progress: bool = False) -> list[float]:
    """Plain training of a dense model (the baseline and the starting point). Returns per-epoch loss."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model.parameters(), cfg)
    total = cfg.epochs * _steps_per_epoch(data, cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, cfg))
    bar = progress_bar(total, "dense") if progress else None
    history = []
    model.train()
    for _ in range(cfg.epochs):
        losses = []
        for xb, yb in _batches(data, cfg.batch_size, gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if bar:
                bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
                bar.update(1)
        history.append(sum(losses) / len(losses))
    if bar:
        bar.close()
    model.eval()
    return history


def train_nested(
    model: NestedModel,
    data,
    cfg: TrainConfig,
    pruning: PruningConfig | None = None,
    *,
    progress: bool = False,
    on_epoch=None,
) -> list[dict]:
    """Joint training of every level with nested gradient masking.

    With ``pruning``, a :class:`ProgressiveSchedule` prunes from the model's current maps to
    ``pruning.densities`` (densest level first, from epoch ``cfg.prune_start``, ``cfg.ramp_epochs``
    per level), then the remaining epochs fine-tune with the final maps. Without it the level maps
    stay as they are. ``data``: ``(x, y)`` tensors or an iterable of batches. ``on_epoch(epoch,
    record)`` is called after every epoch. Returns one record per epoch (loss per level, densities).
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    spe = _steps_per_epoch(data, cfg.batch_size)
    total = cfg.epochs * spe
    schedule = None
    if pruning is not None:
        schedule = ProgressiveSchedule(pruning.densities, int(cfg.prune_start * spe), int(cfg.ramp_epochs * spe))
        if schedule.end > total:
            raise ValueError(
                f"the pruning schedule ends at step {schedule.end} (epoch {schedule.end / spe:g}) "
                f"after training ends ({cfg.epochs} epochs); add epochs or shorten ramp_epochs"
            )
    opt = _optimizer(model.parameters(), cfg)
    guard = PrunedStayZero(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, cfg))
    bar = progress_bar(total, "nested") if progress else None
    num_levels = pruning.num_levels if pruning is not None else model.num_levels
    history, step = [], 0
    current = None
    try:
        model.train()
        for epoch in range(cfg.epochs):
            sums = {}
            for xb, yb in _batches(data, cfg.batch_size, gen):
                if schedule is not None and (step % cfg.prune_every == 0 or step == schedule.end):
                    dens = schedule.densities(step)
                    if dens != current:
                        update_levelmaps_(model, pruning, dens)
                        guard.apply()
                        current = dens
                levels = pick_levels(num_levels, cfg.levels, gen)
                loss, parts = nested_loss(model, xb, yb, levels, distill=cfg.distill, temperature=cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                for k, v in parts.items():
                    sums.setdefault(k, []).append(v)
                if bar:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4g}", refresh=False)
                    bar.update(1)
            record = {
                "epoch": epoch,
                "loss": {k: sum(v) / len(v) for k, v in sorted(sums.items())},
                "densities": list(current) if current is not None else None,
            }
            history.append(record)
            if on_epoch is not None:
                on_epoch(epoch, record)
        if schedule is not None and current != list(pruning.densities):  # finish the schedule
            update_levelmaps_(model, pruning, pruning.densities)
            guard.apply()
    finally:
        if bar:
            bar.close()
        guard.remove()
        model.eval()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, level: int | None = None, batch: int = 1024) -> float:
    """Accuracy (0..1) of ``model`` on ``(x, y)``; a ``NestedModel`` needs ``level``."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        out = model(xb) if level is None else model(xb, level=torch.tensor(level))
        correct += int((out.argmax(-1) == y[i : i + batch]).sum())
    model.train(was)
    return correct / max(len(x), 1)


# --------------------------------------------------------------------------- export


class LevelArgument(nn.Module):
    """``forward(*inputs, level)`` with ``level`` positional (last), for exporters that want it so."""

    def __init__(self, model: NestedModel):
        super().__init__()
        self.model = model

    def forward(self, *args):
        *inputs, level = args
        return self.model(*inputs, level=level)


def example_level(level: int = 0) -> torch.Tensor:
    """The level as the canonical 0-d int64 tensor."""
    return torch.tensor(int(level), dtype=torch.int64)


def export_torch(model: NestedModel, *example_inputs, path=None) -> torch.export.ExportedProgram:
    """``torch.export`` of a nested model; its user inputs are ``(*example_inputs, level)`` with
    ``level`` a 0-d int64 tensor (the form ``tvm_nested.from_torch`` takes). Saved to ``path`` (.pt2)
    when given."""
    model.eval()
    ep = torch.export.export(model, tuple(example_inputs), {"level": example_level(0)})
    if path is not None:
        torch.export.save(ep, str(path))
    return ep


def export_onnx(
    model: NestedModel,
    *example_inputs,
    path,
    input_names: Sequence[str] | None = None,
    opset: int = 17,
    dynamic_batch: bool = True,
) -> None:
    """ONNX export (TorchScript exporter, ``dynamo=False``) with the level an int64 scalar input named
    ``level`` after the model inputs (named ``input_names``, default ``x``, ``x1``, ...). The first
    input's batch dimension is dynamic unless ``dynamic_batch=False`` (static shapes let the exporter
    fold shape arithmetic, which TVM's ONNX frontend does not always import)."""
    model.eval()
    names = list(input_names or [("x" if i == 0 else f"x{i}") for i in range(len(example_inputs))])
    torch.onnx.export(
        LevelArgument(model),
        (*example_inputs, example_level(0)),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=[*names, "level"],
        output_names=["y"],
        dynamic_axes={names[0]: {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None,
    )


# --------------------------------------------------------------------------- the digits task


def digits_data(seed: int = 0, test_size: float = 0.25) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 digits (shipped inside the package), a stratified seeded held-out split:
    ``x_train, y_train, x_test, y_test`` with x as float32 [N, 1, 8, 8] scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = torch.tensor(ds.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(ds.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=ds.target)
    return x[tr], y[tr], x[te], y[te]


def digits_cnn(width: int = 32, seed: int = 0) -> nn.Sequential:
    """A small CNN for 8x8 digits: three 3x3 convs (w, 2w, 2w channels), two 2x2 pools, a linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 4, 10),
    )


def config_dict(cfg) -> dict:
    return asdict(cfg)


__all__ = [
    "LevelArgument",
    "ProgressiveSchedule",
    "PrunedStayZero",
    "TrainConfig",
    "digits_cnn",
    "digits_data",
    "evaluate",
    "example_level",
    "export_onnx",
    "export_torch",
    "nested_loss",
    "pick_levels",
    "progress_bar",
    "train_dense",
    "train_nested",
]
