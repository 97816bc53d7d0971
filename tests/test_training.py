"""Nested training: progressive schedule, gradient masking, a short real run, export round trips."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from tvm_nested.authoring.nn import nest
from tvm_nested.authoring.pruning import PruningConfig, prune_model
from tvm_nested.authoring.training import (
    ProgressiveSchedule,
    PrunedStayZero,
    TrainConfig,
    digits_cnn,
    digits_data,
    evaluate,
    example_level,
    export_onnx,
    export_torch,
    nested_loss,
    pick_levels,
    train_dense,
    train_nested,
)

torch.set_num_threads(1)


def test_progressive_schedule_densest_level_first():
    s = ProgressiveSchedule((0.5, 0.2, 0.1), start=10, ramp=20)
    assert s.densities(0) == [1.0, 1.0, 1.0]
    for t in range(0, 100):
        d = s.densities(t)
        assert all(b <= a for a, b in itertools.pairwise(d)), (t, d)  # nested at every step
        if t < 30:
            assert d[1] == d[0] and d[2] == d[0]  # only level 0 moves first
    assert s.densities(30) == [0.5, 0.5, 0.5]
    assert s.densities(49)[0] == 0.5 and 0.2 < s.densities(49)[1] < 0.5
    assert s.densities(s.end) == [0.5, 0.2, 0.1]


@pytest.mark.parametrize("how,expected", [("all", [0, 1, 2, 3]), (4, [0, 1, 2, 3])], ids=["all", "k=L"])
def test_pick_levels_all(how, expected):
    assert pick_levels(4, how, torch.Generator().manual_seed(0)) == expected


def test_pick_levels_sandwich():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        lv = pick_levels(5, 3, gen)
        assert len(lv) == 3 and lv[0] == 0 and lv[-1] == 4


def _toy(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    lm = np.random.default_rng(seed).integers(-1, 3, size=(8, 6)).astype(np.int32)  # levels 0..2 and pruned
    return nest(model, {"0": lm, "2": [1.0, 0.5, 0.25]}), lm


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


@pytest.mark.parametrize(
    "opt",
    [
        pytest.param(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1), id="sgd-momentum-wd"),
        pytest.param(lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1), id="adamw"),
    ],
)
def test_pruned_everywhere_stay_exactly_zero(opt):
    model, lm = _toy()
    layer = model.module[0]
    with torch.no_grad():  # weights and optimizer state are non-zero before pruning (a dense phase)
        layer.level_map.fill_(2)
    optimizer = opt(model.parameters())
    x, y = _batch()
    for _ in range(3):
        loss, _ = nested_loss(model, x, y, [0, 1, 2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layer.level_map.copy_(torch.from_numpy(lm))  # now prune: momentum buffers hold stale values
    guard = PrunedStayZero(model, optimizer)
    pruned = torch.from_numpy(lm == -1)
    for step in range(5):
        loss, _ = nested_loss(model, x, y, [0, 1, 2], distill=0.5)
        optimizer.zero_grad()
        loss.backward()
        assert (layer.weight.grad[pruned] == 0).all()
        optimizer.step()
        assert (layer.weight[pruned] == 0).all(), step
    assert (layer.weight[~pruned] != 0).all()
    guard.remove()


def test_gradient_only_from_levels_that_contain_the_weight():
    model, lm = _toy(1)
    layer = model.module[0]
    x, y = _batch(1)
    loss, _ = nested_loss(model, x, y, [1])  # level 1 alone
    loss.backward()
    g = layer.weight.grad
    assert (g[torch.from_numpy(lm < 1)] == 0).all()  # weights only in level 0 (or nowhere) get nothing
    assert (g[torch.from_numpy(lm >= 1)] != 0).any()


def test_weight_shared_by_levels_is_updated():
    model, lm = _toy(2)
    layer = model.module[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = PrunedStayZero(model, optimizer)  # zeroes the weights pruned everywhere now
    before = layer.weight.detach().clone()
    x, y = _batch(2)
    loss, _ = nested_loss(model, x, y, [2])  # the sparsest level: only weights with LM == 2 are in it
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = (layer.weight != before).numpy()
    assert changed[lm == 2].any()
    assert not changed[lm < 2].any()
    guard.remove()


def test_short_training_improves_every_level():
    x_tr, y_tr, x_te, y_te = digits_data(seed=0)
    x_tr, y_tr = x_tr[:512], y_tr[:512]
    model = prune_model(digits_cnn(width=8, seed=0), PruningConfig(densities=(1.0, 1.0, 1.0)))
    pruning = PruningConfig(densities=(0.6, 0.3, 0.15), scope="global")
    before = [evaluate(model, x_te, y_te, lvl) for lvl in range(3)]
    cfg = TrainConfig(
        epochs=4, batch_size=32, lr=0.1, weight_decay=1e-4, ramp_epochs=1, prune_every=4, distill=0.5, seed=0
    )
    history = train_nested(model, (x_tr, y_tr), cfg, pruning)
    after = [evaluate(model, x_te, y_te, lvl) for lvl in range(3)]
    assert history[-1]["densities"] == [0.6, 0.3, 0.15]
    for lvl in range(3):
        kept = sum(int((m.level_map >= lvl).sum()) for _, m in model.nested_layers())
        total = sum(m.weight.numel() for _, m in model.nested_layers())
        assert kept == pytest.approx(pruning.densities[lvl] * total, abs=1)
        assert after[lvl] > before[lvl] + 0.3, (lvl, before, after)


@pytest.mark.filterwarnings("error")  # torch warned on every run that the bar read a loss needing grad
def test_training_shows_one_tqdm_bar(capsys):
    """The hand-written bar went the way of tune's: one tqdm bar per phase on stderr (steps done of
    the total, time left, the last loss), nothing on stdout."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    model = prune_model(digits_cnn(width=4, seed=0), PruningConfig(densities=(0.5, 0.25)))
    cfg = TrainConfig(epochs=2, batch_size=32, seed=0)
    train_dense(digits_cnn(width=4, seed=0), (x, y), cfg, progress=True)
    train_nested(model, (x, y), cfg, progress=True)
    out = capsys.readouterr()
    assert out.out == ""
    for phase in ("dense", "nested"):
        assert f"{phase}: 100%" in out.err and "4/4 [" in out.err and "step/s, loss=" in out.err, out.err


@pytest.fixture(scope="module")
def trained_small():
    torch.manual_seed(0)
    model = prune_model(digits_cnn(width=4, seed=0), PruningConfig(densities=(0.5, 0.25, 0.1), balanced=True))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return model, x


@pytest.mark.parametrize("level", [0, 1, 2], ids=lambda l: f"level{l}")
def test_torch_export_roundtrip(trained_small, level):
    model, x = trained_small
    ep = export_torch(model, x)
    assert [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"][-1] == "level"
    torch.testing.assert_close(ep.module()(x, level=example_level(level)), model(x, level=torch.tensor(level)))


@pytest.fixture(scope="module")
def onnx_session(trained_small, tmp_path_factory):
    import onnxruntime as ort

    model, x = trained_small
    path = tmp_path_factory.mktemp("onnx") / "nested.onnx"
    export_onnx(model, x, path=path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("level", [0, 1, 2], ids=lambda l: f"level{l}")
def test_onnx_roundtrip(trained_small, onnx_session, level):
    model, x = trained_small
    names = [i.name for i in onnx_session.get_inputs()]
    assert names == ["x", "level"]
    (got,) = onnx_session.run(None, {"x": x.numpy(), "level": np.array(level, dtype=np.int64)})
    want = model(x, level=torch.tensor(level)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cli_nest_pt2_roundtrip(tmp_path):
    from tvm_nested.cli.train import nest_main

    dense = digits_cnn(width=4, seed=0).eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.export.save(torch.export.export(dense, (x,)), str(tmp_path / "dense.pt2"))
    assert nest_main([str(tmp_path / "dense.pt2"), "--densities", "0.5,0.2", "-o", str(tmp_path / "n.pt2")]) == 0
    ep = torch.export.load(str(tmp_path / "n.pt2"))
    want = prune_model(dense, PruningConfig(densities=(0.5, 0.2)))
    for lvl in range(2):
        torch.testing.assert_close(ep.module()(x, level=example_level(lvl)), want(x, level=torch.tensor(lvl)))


def test_cli_train_config_refuses_unknown_keys(tmp_path):
    from tvm_nested.cli.train import load_config

    (tmp_path / "c.json").write_text('{"nested": {"epochs": 2, "lr_typo": 1}}')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr_typo'\] in \[nested\]"):
        load_config(tmp_path / "c.json")
    (tmp_path / "c.toml").write_text('width = 8\n[pruning]\ndensities = [0.5, 0.1]\nscope = "global"\n')
    exp = load_config(tmp_path / "c.toml")
    assert exp.width == 8 and exp.pruning.densities == (0.5, 0.1) and exp.pruning.scope == "global"


@pytest.mark.parametrize("via", ["torch", "onnx"])
def test_compiled_roundtrip(trained_small, tmp_path, via):
    """Trained model -> from_torch or ONNX export + from_onnx -> build(llvm) -> export/load -> every level
    against PyTorch."""
    import tvm_nested

    model, x = trained_small
    if via == "torch":
        mod = tvm_nested.from_torch(model, (x, example_level(0)))
    else:
        export_onnx(model, x, path=tmp_path / "model.onnx")  # declares a dynamic batch dimension
        with pytest.raises(ValueError, match=r"dynamic or undeclared dimension.*shape_dict"):
            tvm_nested.from_onnx(tmp_path / "model.onnx")
        mod = tvm_nested.from_onnx(tmp_path / "model.onnx", shape_dict={"x": list(x.shape)})
    lib = tvm_nested.build(mod, target="llvm")
    assert lib.num_levels == 3
    lib.export_library(str(tmp_path / "model.so"))
    rt = tvm_nested.load(str(tmp_path / "model.so"))
    for level in range(3):
        (got,) = rt.run(x.numpy(), level=level)
        want = model(x, level=torch.tensor(level)).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_pruned_recurrent_weights_stay_zero_while_training():
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.GRU(6, 8, batch_first=True), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    model = prune_model(Tagger(), PruningConfig(densities=(0.5, 0.25)))
    x, y = torch.randn(16, 4, 6), torch.randint(0, 3, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    guard = PrunedStayZero(model, optimizer)
    before = {w.name: w.weight.detach().clone() for w in model.nested_weights()}
    for _ in range(3):
        loss, _ = nested_loss(model, x, y, [0, 1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    guard.remove()
    for w in model.nested_weights():
        pruned = w.level_map < 0
        assert (w.weight[pruned] == 0).all(), w.name
        assert not torch.equal(w.weight[~pruned], before[w.name][~pruned]), f"{w.name} trains"
