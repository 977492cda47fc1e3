"""`python -m jaxrlhf.env` and the backend-aware `dtype: "auto"`."""
import json
import os
import subprocess
import sys

from jax.tree_util import tree_leaves as jax_leaves

from trainer_utils import REPO, load_config

from jaxrlhf import env
from jaxrlhf.models.config import ModelConfig, preset, resolve_dtype


def test_auto_dtype_is_bf16_on_accelerators_and_fp32_on_cpu():
    assert resolve_dtype("auto", "gpu") == "bfloat16"
    assert resolve_dtype("auto", "tpu") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert ModelConfig().dtype == "float32"          # this test process runs on CPU
    assert preset("tiny").param_dtype == "float32"   # master weights stay fp32


def test_describe_reports_the_mesh_and_model_of_a_config():
    c = load_config("ppo", "lora=8")
    c.mesh.data, c.mesh.fsdp = 2, 4
    report = env.describe(c)
    assert report["backend"] == "cpu" and report["devices"] == 8
    assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert report["model"]["dtype"] == "float32" and report["lora"]["rank"] == 8
    assert report["dtype_auto"] == "float32"
    assert report["model"]["attention"].startswith("einsum")   # CPU: the einsum path


def test_describe_reports_the_cli_allocator(monkeypatch):
    from jaxrlhf import _host_malloc
    monkeypatch.setattr(_host_malloc, "hugepage_env", lambda e: None if
                        e.get("JAXRLHF_HOST_MALLOC") or "hugetlb" in e.get("GLIBC_TUNABLES", "")
                        else dict(e))
    monkeypatch.delenv("JAXRLHF_HOST_MALLOC", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert env.describe()["cli_host_malloc"].startswith("hugepages")
    # Inside the re-executed CLI (both variables set by the re-exec) the answer is the same.
    monkeypatch.setenv("JAXRLHF_HOST_MALLOC", "hugepages")
    monkeypatch.setenv("GLIBC_TUNABLES", _host_malloc.HUGEPAGE_TUNABLE)
    assert env.describe()["cli_host_malloc"].startswith("hugepages")
    monkeypatch.setenv("JAXRLHF_HOST_MALLOC", "default")
    assert env.describe()["cli_host_malloc"] == "default"


def test_describe_resolves_attention_from_an_hf_config():
    c = load_config("sft")
    c.init_from = os.path.join(REPO, "tests", "fixtures", "hf", "qwen3")
    c.model.attention = "xla"
    assert env.describe(c)["model"]["attention"].startswith("xla")


def test_cli_prints_json():
    out = subprocess.run([sys.executable, "-m", "jaxrlhf.env", "--json", "--config",
                          os.path.join(REPO, "configs", "tiny_pipeline.py")],
                         capture_output=True, text=True, cwd=REPO, check=True)
    report = json.loads(out.stdout)
    assert report["stage"] == "pipeline" and report["model"]["preset"] == "tiny"


def test_manual_multi_host_launch_reads_process_count_and_id(monkeypatch):
    import jax
    import pytest

    from jaxrlhf.trainers import common
    assert common.distributed_args({}) == {}
    assert common.distributed_args({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}) == {
        "num_processes": 2, "process_id": 1}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        common.distributed_args({"JAX_PROCESS_ID": "first"})
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    common.maybe_initialize_distributed(load_config("sft"))
    assert calls == [{"num_processes": 2, "process_id": 0}]


def test_device_budget_counts_the_donated_state_and_remat_shrinks_temporaries():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import device_budget
    from flax import nnx

    from jaxrlhf.models.transformer import init_model
    cfg = preset("tiny", dtype="float32")
    n = sum(x.size for x in jax_leaves(nnx.state(init_model(cfg))))
    none, full = (device_budget.budget(cfg.replace(remat=r), "sft", 8, 32)
                  for r in ("none", "full"))
    assert none["params"] == 4 * n                       # fp32 master weights
    assert none["opt_state"] >= 2 * none["params"]       # AdamW's two moments (+ counters)
    assert none["donated_aliases"] >= none["params"] + none["opt_state"]
    assert full["temp"] < none["temp"]
    assert none["peak"] == (none["arguments"] + none["outputs"] - none["donated_aliases"]
                            + none["temp"])


def test_profile_decode_reads_shapes_and_operands_from_optimized_hlo(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import profile_decode as pd

    (tmp_path / "m.jit__generate_impl.cpu_after_optimizations.txt").write_text(
        "  %w.1 = f32[576,1536]{1,0} get-tuple-element(%p), index=3\n"
        "  %x.2 = f32[8,576]{1,0} parameter(0)\n"
        "  %ynn_fusion.7 = f32[8,1536]{1,0} fusion(%x.2, %w.1), kind=kCustom, calls=%c\n"
        "  ROOT %t = (s32[], f32[8,1536]{1,0}) tuple(%i, %ynn_fusion.7)\n")
    table = pd._hlo_table(str(tmp_path), "*jit__generate_impl*after_optimizations.txt")
    assert table["ynn_fusion.7"] == ("f32[8,1536]", "fusion", ["x.2", "w.1"])
    assert [table[o][0] for o in table["ynn_fusion.7"][2]] == ["f32[8,576]", "f32[576,1536]"]
    assert pd._nbytes("f32[576,1536]") == 576 * 1536 * 4
    assert pd._nbytes("bf16[8,3]") == 48 and pd._nbytes("s32[]") == 4
    assert not pd._is_op("ThunkExecutor::Execute") and pd._is_op("ynn_fusion.7")


def test_cpu_name_reads_model_family_and_vector_isa(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import _bench_common as bc

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"
                   "model\t\t: 17\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 "
                   "avx512f avx512bw\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert bc.cpu_name(str(x86)) == "AMD EPYC (family 25, model 17, avx512f)"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n")
    assert bc.cpu_name(str(arm))    # no model name: the architecture, not an empty string
    assert bc.cpu_name(str(tmp_path / "missing"))
