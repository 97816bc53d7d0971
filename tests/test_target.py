"""Target translation: classic strings, dicts, tags and Target objects all reach TVM 0.27."""

import pytest
from tvm.target import Target

from tvm_nested.target import canonical, is_cross, parse_target


@pytest.mark.parametrize(
    "text, kind, attrs",
    [
        ("llvm -mtriple=aarch64-linux-gnu -mattr=+neon", "llvm", {"mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}),
        ("llvm -mtriple=aarch64", "llvm", {"mtriple": "aarch64-linux-gnu"}),
        ("llvm -mcpu=skylake-avx512", "llvm", {"mcpu": "skylake-avx512"}),
        ("llvm -mcpu=cortex-a72", "llvm", {"mcpu": "cortex-a72", "mtriple": "aarch64-linux-gnu"}),
        ("llvm -mtriple=aarch64-linux-gnu -num-cores=4", "llvm", {"num-cores": 4}),
        ("cuda -arch=sm_80", "cuda", {"arch": "sm_80"}),
    ],
    ids=["aarch64-neon", "bare-aarch64", "x86-mcpu", "arm-mcpu-adds-triple", "num-cores", "cuda"],
)
def test_classic_strings(text, kind, attrs):
    t = parse_target(text)
    assert t.kind.name == kind
    for key, value in attrs.items():
        got = t.attrs[key]
        assert (list(got) if isinstance(value, list) else got) == value


def test_bare_llvm_means_this_cpu():
    t = parse_target("llvm")
    host = Target.from_device(__import__("tvm").cpu())
    assert t.attrs["mtriple"] == host.attrs["mtriple"]
    assert int(t.attrs["num-cores"]) >= 1
    assert not is_cross(t)


@pytest.mark.parametrize(
    "target",
    [
        {"kind": "llvm", "mtriple": "aarch64"},
        '{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}',
        Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}),
        "raspberry-pi/4b-aarch64",
    ],
    ids=["dict", "json", "Target", "tag"],
)
def test_other_forms_aarch64(target):
    t = parse_target(target)
    assert str(t.attrs["mtriple"]).startswith("aarch64")
    assert is_cross(t)


def test_tag_cuda():
    t = parse_target("nvidia/nvidia-a100")
    assert t.kind.name == "cuda" and t.attrs["arch"] == "sm_80"


@pytest.mark.parametrize(
    "text, match",
    [
        ("llvm -foo=1", "unknown option '-foo' for kind 'llvm'"),
        ("cuda", "needs an architecture"),
        ("nosuchkind -x=1", "unknown target kind"),
        ("llvm -num-cores=many", "needs an integer"),
        ("", "target must be"),
    ],
    ids=["unknown-key", "cuda-no-arch", "unknown-kind", "bad-int", "empty"],
)
def test_bad_targets(text, match):
    with pytest.raises(ValueError, match=match):
        parse_target(text)


def test_canonical_distinguishes_whole_target():
    a = canonical("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72")
    b = canonical("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a76")
    assert a != b and canonical({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}) == a


@pytest.mark.parametrize(
    "target, triple",
    [
        ("llvm -mcpu=nosuchcpu", "x86_64"),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-z99", "aarch64-linux-gnu"),
        ("llvm -mcpu=cortex-z99", "aarch64-linux-gnu"),  # an ARM-looking name gets the ARM triple
        ({"kind": "llvm", "mtriple": "aarch64", "mcpu": "bogus"}, "aarch64-linux-gnu"),
        ('{"kind": "llvm", "mcpu": "bogus"}', "x86_64"),
    ],
    ids=["x86", "aarch64", "arm-name", "dict", "json"],
)
def test_an_unknown_cpu_is_refused_before_tvm_sees_it(target, triple, capfd):
    """LLVM compiled for a generic CPU and the CLI exited 0 (TVM only logged 'Error' for aarch64)."""
    with pytest.raises(ValueError, match=rf"is not a CPU LLVM knows for {triple}.*generic CPU\); known: "):
        parse_target(target)
    assert capfd.readouterr().err == ""  # one error, not TVM's log line before it


@pytest.mark.parametrize("triple", ["nonsense", "foo-linux-gnu"])
def test_a_triple_llvm_has_no_target_for_is_refused(triple):
    """Building for it crashed the process (SIGSEGV in LLVM)."""
    with pytest.raises(ValueError, match=rf"-mtriple={triple}: LLVM has no target for it"):
        parse_target(f"llvm -mtriple={triple}")


@pytest.mark.parametrize("triple", ["armv7l-linux-gnueabihf", "i686-linux-gnu", "riscv64-linux-gnu"])
def test_triples_llvm_knows_pass(triple, capfd):
    assert str(parse_target(f"llvm -mtriple={triple}").attrs["mtriple"]) == triple
    assert capfd.readouterr().err == ""
