"""LiON-LoRA diagnostic: per layer, the norms of each adapter's update and output and the cosine
similarity between the adapters' outputs (the paper's orthogonality and norm-consistency figures,
LiON-LoRA §3.3, figures 4 and 5), as a table and a plot.

For a model with several LoRAs loaded through peft (diffusers `load_lora_weights` / `add_adapter`)
and one input, `lion_diagnostics(model, inputs)` runs the model's forward once and, at every peft
LoRA `Linear` it passes through, takes the layer's input x [b ... d_in] (x's first axis is the sample
axis, as for the `output` normalisation) and, for every adapter i loaded there:
  - ‖ΔWᵢ‖_F, the norm of the effective update ΔWᵢ = γᵢ BᵢAᵢ (γᵢ = lora_alpha/r, or lora_alpha/√r
    with rslora; the adapter weight of `set_adapters` is left out: it is the user's knob, not the LoRA's);
  - ‖ΔWᵢ x_b‖_F per sample b, the norm of the adapter's output over the sample's tokens;
  - cos(i, j) per sample: ⟨ΔWᵢ x_b, ΔWⱼ x_b⟩ / (‖ΔWᵢ x_b‖ ‖ΔWⱼ x_b‖) over the sample's tokens and
    channels (0: orthogonal outputs, 1: the same direction), and its mean over the samples.
The forward runs the model as it is configured (active adapters, their weights, patched or not), so
each layer's x is what that layer saw in that run. Statistics are computed in float64 inside forward
hooks, one layer at a time (nothing of size [b, tokens, d] is kept), and the hooks are removed after.

>>> report = lion_diagnostics(transformer, dict(hidden_states=..., encoder_hidden_states=..., timestep=t))
>>> print(report.table())
>>> report.plot("lion_norms.png")
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class LayerStats:
    """One call of one peft LoRA layer. k adapters, b samples."""
    name: str                        # module name in the model ("#n" appended for its n-th further call)
    adapters: tuple[str, ...]
    weight_norms: list[float]        # [k]    ‖γᵢBᵢAᵢ‖_F
    output_norms: list[list[float]]  # [b][k] ‖γᵢBᵢAᵢ x_b‖_F
    cosine: list[list[list[float]]]  # [b][k][k] cosine similarity of the adapters' outputs, per sample

    def mean_output_norms(self) -> list[float]:
        """[k]: ‖ΔWᵢ x_b‖ averaged over the samples."""
        return torch.tensor(self.output_norms, dtype=torch.float64).mean(0).tolist()

    def mean_cosine(self) -> list[list[float]]:
        """[k][k]: the per-sample cosine similarities averaged over the samples."""
        return torch.tensor(self.cosine, dtype=torch.float64).mean(0).tolist()


@dataclass
class LionReport:
    layers: list[LayerStats] = field(default_factory=list)

    @property
    def adapters(self) -> tuple[str, ...]:
        """Every adapter seen, in first-seen order."""
        return tuple(dict.fromkeys(a for layer in self.layers for a in layer.adapters))

    def pairs(self) -> list[tuple[str, str]]:
        return list(itertools.combinations(self.adapters, 2))

    def table(self) -> str:
        """One row per layer call: ‖ΔW‖ and mean ‖ΔW x‖ per adapter, mean cosine per adapter pair."""
        names, pairs = self.adapters, self.pairs()
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        head = ([f"‖ΔW‖ {a}" for a in names] + [f"‖ΔWx‖ {a}" for a in names]
                + [f"cos {a}·{b}" for a, b in pairs])
        cols = [max(10, len(h)) for h in head]
        lines = ["layer".ljust(width) + "  " + "  ".join(h.rjust(c) for h, c in zip(head, cols))]
        for layer in self.layers:
            idx = {a: i for i, a in enumerate(layer.adapters)}
            out, cos = layer.mean_output_norms(), layer.mean_cosine()
            cells = ([_fmt(layer.weight_norms[idx[a]]) if a in idx else "-" for a in names]
                     + [_fmt(out[idx[a]]) if a in idx else "-" for a in names]
                     + [f"{cos[idx[a]][idx[b]]:+.3f}" if a in idx and b in idx else "-" for a, b in pairs])
            lines.append(layer.name.ljust(width) + "  " + "  ".join(s.rjust(c) for s, c in zip(cells, cols)))
        return "\n".join(lines)

    def plot(self, path) -> Path:
        """Write a two-panel figure to `path` (any format matplotlib saves by extension): top, per
        layer, each adapter's mean output norm ‖ΔW x‖ (solid) and update norm ‖ΔW‖ (dashed, log
        scale); bottom, the mean cosine similarity of every adapter pair per layer. Returns the path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        steps = range(len(self.layers))
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.25 * len(self.layers) + 3), 7), sharex=True)
        for a in self.adapters:
            rows = [(s, layer, layer.adapters.index(a)) for s, layer in zip(steps, self.layers) if a in layer.adapters]
            xs = [s for s, _, _ in rows]
            line, = top.plot(xs, [layer.mean_output_norms()[i] for _, layer, i in rows], marker="o", ms=3,
                             label=f"{a}: ‖ΔW x‖")
            top.plot(xs, [layer.weight_norms[i] for _, layer, i in rows], ls="--", color=line.get_color(),
                     label=f"{a}: ‖ΔW‖")
        top.set_yscale("log")
        top.set_ylabel("norm")
        top.set_title("LoRA update and output norms per layer (norm consistency)")
        top.legend(fontsize=7, ncol=2)
        for a, b in self.pairs():
            rows = [(s, layer) for s, layer in zip(steps, self.layers) if a in layer.adapters and b in layer.adapters]
            bottom.plot([s for s, _ in rows],
                        [layer.mean_cosine()[layer.adapters.index(a)][layer.adapters.index(b)] for _, layer in rows],
                        marker="o", ms=3, label=f"{a} · {b}")
        bottom.axhline(0.0, color="grey", lw=0.5)
        bottom.set_ylim(-1.05, 1.05)
        bottom.set_ylabel("cosine similarity of outputs")
        bottom.set_title("Orthogonality of the adapters' outputs per layer")
        if self.pairs():
            bottom.legend(fontsize=7)
        bottom.set_xticks(list(steps))
        bottom.set_xticklabels([layer.name for layer in self.layers], rotation=90, fontsize=6)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _lora_layers(model: torch.nn.Module):
    from lightmotion_fast.integrations.diffusers.lora import _peft_lora_linear_class

    cls = _peft_lora_linear_class()
    if cls is None:
        raise ImportError("lion_diagnostics needs peft (the LoRAs are read from peft's LoRA layers)")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


def layer_stats(name: str, layer, x: torch.Tensor, adapters: Sequence[str]) -> LayerStats:
    """The statistics of one peft LoRA layer for its input x [b ... d_in] (float64 throughout)."""
    from lightmotion_fast.integrations.diffusers.lora import adapter_scaling

    x = x.detach().double()
    x = x.reshape(x.shape[0] if x.ndim >= 2 else 1, -1, x.shape[-1])        # [b t d_in]
    weight_norms, outputs = [], []
    for a in adapters:
        gamma = adapter_scaling(layer, a)
        la, lb = layer.lora_A[a].weight.detach().double(), layer.lora_B[a].weight.detach().double()
        weight_norms.append(abs(gamma) * torch.linalg.matrix_norm(lb @ la).item())
        outputs.append((gamma * (x @ la.T) @ lb.T).flatten(1))              # [b, t·d_out]
    out = torch.stack(outputs, dim=1)                                        # [b k t·d_out]
    norms = out.norm(dim=-1)                                                 # [b k]
    gram = out @ out.transpose(1, 2)                                         # [b k k]
    denom = norms[:, :, None] * norms[:, None, :]
    cosine = torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1), 0)
    return LayerStats(name, tuple(adapters), weight_norms, norms.tolist(), cosine.tolist())


def lion_diagnostics(model: torch.nn.Module, inputs, adapters: Sequence[str] | None = None) -> LionReport:
    """Run `model(**inputs)` (a Mapping) or `model(*inputs)` (a tuple) once under no_grad and return
    the LiON-LoRA statistics of every peft LoRA layer call, in call order. adapters: which adapters
    to measure (default: every adapter loaded on each layer); a layer holding fewer than two of them
    still reports its norms. Raises ValueError if the model has no peft LoRA layer or a named adapter
    is loaded nowhere."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no peft LoRA layer: load adapters first "
                         "(load_lora_weights / add_adapter)")
    if adapters is not None:
        if isinstance(adapters, str):
            raise ValueError(f"adapters must be a list of adapter names, got {adapters!r}")
        loaded = {a for _, m in layers for a in m.lora_A}
        missing = [a for a in adapters if a not in loaded]
        if missing:
            raise ValueError(f"adapters {missing} are not loaded on any LoRA layer (loaded: {sorted(loaded)})")
    report = LionReport()
    calls: dict[str, int] = {}

    def hook(name):
        def pre_hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            names = [a for a in (adapters if adapters is not None else module.lora_A) if a in module.lora_A]
            if names:
                n = calls.get(name, 0)
                calls[name] = n + 1
                report.layers.append(layer_stats(name if n == 0 else f"{name}#{n}", module, x, names))
        return pre_hook

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in layers]
    try:
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                model(**inputs)
            else:
                model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return report
