"""The model families of the nested-sparsity papers, small but faithful, as users write them in PyTorch.

Arxiv 2112.10930 and Grimaldi et al. evaluate nested sparsity on ResNet, MobileNet, PointNet++,
GNMT (an LSTM encoder-decoder with attention), graph attention networks and Transformers. Each builder
here returns a dense ``nn.Module`` (seeded, in eval mode, BatchNorm statistics that are not trivial)
and example inputs; the layers are the stock ones (``nn.Conv2d``, ``nn.LSTM``,
``nn.TransformerEncoderLayer``...), so nesting them (``pruning.prune_model``) exercises what users do:

    model, inputs = families.build("gnmt")
    nested = prune_model(model, PruningConfig((0.5, 0.2, 0.1)))
    mod = tvm_nested.from_torch(nested, inputs, {"level": torch.tensor(0)})

The sizes are tiny (a build takes seconds); the structure is the family's: bottleneck blocks with
projection shortcuts, inverted residuals with depthwise and dilated convolutions, farthest-point
sampling and k-nearest-neighbour grouping, a bidirectional then residual LSTM encoder with an
attentive LSTM decoder, multi-head graph attention over an adjacency mask, and encoder / decoder
layers with a causal mask.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Running statistics and affine parameters that make BatchNorm do something (folding is tested)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)


# ------------------------------------------------------------------------------------- ResNet
class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, each with BatchNorm; projection shortcut when the shape changes."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(Bottleneck(16, 8, 32), Bottleneck(32, 8, 32), Bottleneck(32, 16, 64, stride=2))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        y = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


# ---------------------------------------------------------------------------------- MobileNet
class InvertedResidual(nn.Module):
    """MobileNet V2: 1x1 expand, 3x3 depthwise (strided or dilated), 1x1 linear projection; ReLU6."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, dilation, dilation=dilation, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNet(nn.Module):
    """A V1 depthwise-separable block, a grouped 1x1, then V2 inverted residuals (one dilated)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.v1 = nn.Sequential(
            nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False),  # depthwise
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 1, groups=2, bias=False),  # grouped pointwise
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.v2 = nn.Sequential(
            InvertedResidual(16, 16, 4),
            InvertedResidual(16, 24, 4, stride=2),
            InvertedResidual(24, 24, 4, dilation=2),
        )
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        y = self.head(self.v2(self.v1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


# ---------------------------------------------------------------------------------- PointNet++
def farthest_points(xyz: torch.Tensor, count: int) -> torch.Tensor:
    """Indices ``(B, count)`` of farthest-point sampling, starting at point 0 (deterministic)."""
    b, n, _ = xyz.shape
    dist = torch.full((b, n), 1e10, dtype=xyz.dtype)
    far = torch.zeros(b, 1, dtype=torch.long)
    picked = []
    for _ in range(count):
        picked.append(far)
        centre = torch.gather(xyz, 1, far.unsqueeze(-1).expand(b, 1, 3))
        dist = torch.minimum(dist, ((xyz - centre) ** 2).sum(-1))
        far = torch.argmax(dist, dim=1, keepdim=True)
    return torch.cat(picked, 1)


def group(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``points[b, idx[b, ...]]``: (B, N, C) gathered by (B, S, K) -> (B, S, K, C)."""
    b, s, k = idx.shape
    flat = idx.reshape(b, s * k, 1).expand(b, s * k, points.shape[-1])
    return torch.gather(points, 1, flat).reshape(b, s, k, points.shape[-1])


class SetAbstraction(nn.Module):
    """Sample ``npoint`` centroids, group their ``k`` nearest neighbours (relative coordinates and
    features), a shared MLP (1x1 convs + BatchNorm + ReLU) and a max over each group. ``npoint=None``
    groups everything (the global layer)."""

    def __init__(self, npoint: int | None, k: int, cin: int, widths: list[int]):
        super().__init__()
        self.npoint, self.k = npoint, k
        layers, c = [], cin + 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.mlp = nn.Sequential(*layers)

    def forward(self, xyz, feats):
        if self.npoint is None:
            grouped = torch.cat([xyz, feats], -1).unsqueeze(1)  # (B, 1, N, 3 + C)
            new_xyz = xyz.mean(1, keepdim=True)
        else:
            new_xyz = group(xyz, farthest_points(xyz, self.npoint).unsqueeze(-1)).squeeze(2)
            d = ((new_xyz.unsqueeze(2) - xyz.unsqueeze(1)) ** 2).sum(-1)  # (B, S, N)
            idx = torch.topk(d, self.k, dim=-1, largest=False).indices
            rel = group(xyz, idx) - new_xyz.unsqueeze(2)
            grouped = rel if feats is None else torch.cat([rel, group(feats, idx)], -1)
        y = self.mlp(grouped.permute(0, 3, 1, 2))  # (B, C', S, K)
        return new_xyz, y.max(-1).values.transpose(1, 2)


class PointNet2(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.sa1 = SetAbstraction(16, 8, 0, [16, 32])
        self.sa2 = SetAbstraction(8, 4, 32, [32, 64])
        self.sa3 = SetAbstraction(None, 0, 64, [64, 128])
        self.fc = nn.Sequential(nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, xyz):
        xyz1, f1 = self.sa1(xyz, None)
        xyz2, f2 = self.sa2(xyz1, f1)
        _, f3 = self.sa3(xyz2, f2)
        return self.fc(f3.squeeze(1))


# ---------------------------------------------------------------------------------------- GNMT
class GNMT(nn.Module):
    """Encoder: a bidirectional LSTM, then an LSTM with a residual connection. Decoder: an LSTM fed
    the previous context (input feeding), additive (Bahdanau) attention over the encoder states, and
    the classifier over ``[state; context]``. Teacher-forced over the target tokens."""

    def __init__(self, vocab: int = 24, dim: int = 16):
        super().__init__()
        self.src_emb, self.tgt_emb = nn.Embedding(vocab, dim), nn.Embedding(vocab, dim)
        self.enc1 = nn.LSTM(dim, dim, bidirectional=True, batch_first=True)
        self.enc2 = nn.LSTM(2 * dim, 2 * dim, batch_first=True)
        self.dec = nn.LSTM(dim + 2 * dim, 2 * dim, batch_first=True)
        self.att_key, self.att_query = nn.Linear(2 * dim, dim, bias=False), nn.Linear(2 * dim, dim)
        self.att_v = nn.Linear(dim, 1, bias=False)
        self.out = nn.Linear(4 * dim, vocab)

    def forward(self, src, tgt):
        h1, _ = self.enc1(self.src_emb(src))
        h2, _ = self.enc2(h1)
        memory = h1 + h2  # (B, S, 2D), residual
        keys = self.att_key(memory)
        b, steps = tgt.shape
        emb = self.tgt_emb(tgt)
        ctx = memory.new_zeros(b, memory.shape[-1])
        state, logits = None, []
        for t in range(steps):
            y, state = self.dec(torch.cat([emb[:, t], ctx], -1).unsqueeze(1), state)
            q = y[:, 0]
            score = self.att_v(torch.tanh(keys + self.att_query(q).unsqueeze(1))).squeeze(-1)  # (B, S)
            ctx = (torch.softmax(score, -1).unsqueeze(-1) * memory).sum(1)
            logits.append(self.out(torch.cat([q, ctx], -1)))
        return torch.stack(logits, 1)


# ----------------------------------------------------------------------------------------- GAT
class GATLayer(nn.Module):
    """Multi-head graph attention (Velickovic et al.): a shared linear map, per-head attention
    vectors, LeakyReLU scores masked by the adjacency, a softmax over neighbours."""

    def __init__(self, cin: int, cout: int, heads: int, concat: bool = True):
        super().__init__()
        self.heads, self.cout, self.concat = heads, cout, concat
        self.proj = nn.Linear(cin, heads * cout, bias=False)
        self.att_src = nn.Parameter(torch.randn(heads, cout) * 0.3)
        self.att_dst = nn.Parameter(torch.randn(heads, cout) * 0.3)
        self.bias = nn.Parameter(torch.zeros(heads * cout if concat else cout))

    def forward(self, x, adj):
        n = x.shape[0]
        h = self.proj(x).reshape(n, self.heads, self.cout)
        src, dst = (h * self.att_src).sum(-1), (h * self.att_dst).sum(-1)  # (N, H)
        e = F.leaky_relu(dst.unsqueeze(1) + src.unsqueeze(0), 0.2)  # (N_dst, N_src, H)
        e = torch.where(adj.unsqueeze(-1) > 0, e, torch.full_like(e, -1e9))
        a = torch.softmax(e, dim=1)
        out = torch.einsum("ijh,jhc->ihc", a, h)
        out = out.reshape(n, -1) if self.concat else out.mean(1)
        return out + self.bias


class GAT(nn.Module):
    def __init__(self, cin: int = 12, hidden: int = 8, heads: int = 4, classes: int = 5):
        super().__init__()
        self.gat1 = GATLayer(cin, hidden, heads)
        self.gat2 = GATLayer(hidden * heads, classes, 1, concat=False)

    def forward(self, x, adj):
        return self.gat2(F.elu(self.gat1(x, adj)), adj)


# --------------------------------------------------------------------------------- Transformer
class Transformer(nn.Module):
    """Stock ``nn.TransformerEncoderLayer`` + ``nn.TransformerDecoderLayer`` (batch first, so PyTorch's
    inference fast path applies to the dense encoder) with a causal target mask and a classifier."""

    def __init__(self, dim: int = 16, heads: int = 2, ff: int = 32, classes: int = 7):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(dim, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, src, tgt):
        steps = tgt.shape[1]
        causal = torch.triu(torch.full((steps, steps), float("-inf")), diagonal=1)
        return self.head(self.decoder(tgt, self.encoder(src), tgt_mask=causal))


# ------------------------------------------------------------------------------------ builders
def _inputs(name: str, g: torch.Generator) -> tuple:
    if name in ("resnet", "mobilenet"):
        return (torch.randn(1, 3, 16, 16, generator=g),)
    if name == "pointnet2":
        return (torch.rand(2, 32, 3, generator=g),)
    if name == "gnmt":
        return (torch.randint(0, 24, (2, 6), generator=g), torch.randint(0, 24, (2, 4), generator=g))
    if name == "gat":
        adj = (torch.rand(10, 10, generator=g) < 0.3).float()
        return (torch.randn(10, 12, generator=g), ((adj + adj.T + torch.eye(10)) > 0).float())
    return (torch.randn(2, 6, 16, generator=g), torch.randn(2, 4, 16, generator=g))


FAMILIES = {
    "resnet": ResNet,
    "mobilenet": MobileNet,
    "pointnet2": PointNet2,
    "gnmt": GNMT,
    "gat": GAT,
    "transformer": Transformer,
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    """``(dense model in eval mode, example inputs)`` of the family ``name`` (see ``FAMILIES``)."""
    if name not in FAMILIES:
        raise ValueError(f"no model family {name!r}; known: {sorted(FAMILIES)}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = FAMILIES[name]()
    _randomize_batchnorm(model, g)
    return model.eval(), _inputs(name, g)


__all__ = ["FAMILIES", "build"]
