"""Every benchmark family runs end to end on tiny shapes (through `python -m janus_fast.bench`,
as on a GPU), writes one JSON line per case, and render.py merges the lines into one report with
a summary, reasons and charts. A broken benchmark fails here, not on a scarce GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import harness, render
from janus_fast import bench, peers

REPO = Path(__file__).resolve().parent.parent
PRESENT = [f for f in bench.FAMILIES if (REPO / "benchmarks" / f"bench_{f}.py").is_file()]
MISSING = [f for f in bench.FAMILIES if f not in PRESENT]
DEVICE_NAME = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# Two halves of about equal cost, run at once (CI has two cores); each as `python -m janus_fast.bench` runs
HALVES = (("generation", "generation_sjd", "vq", "sampling"), ("attention", "flex", "training"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Every family's tiny shapes through `python -m janus_fast.bench --tiny`, in two processes."""
    out = tmp_path_factory.mktemp("bench")
    assert sorted(f for half in HALVES for f in half) == sorted(bench.FAMILIES)
    jobs = [subprocess.Popen([sys.executable, "-m", "janus_fast.bench", "--tiny", "--out", str(out),
                              *(arg for f in half for arg in ("--family", f))], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for half in HALVES]
    for job in jobs:
        output = job.communicate(timeout=900)[0]
        assert job.returncode == 0, output[-6000:]
    return out


def lines_of(out: Path, family: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{family}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", PRESENT)
def test_family_runs_on_tiny_shapes(tiny_run, family):
    lines = lines_of(tiny_run, family)
    failed = [f"{x['case']} / {x['label']}: {x.get('reason')}" for x in lines if x["status"] == "failed"]
    assert not failed, "\n".join(failed)
    ok = [x for x in lines if x["status"] == "ok"]
    assert ok, f"{family}: no case was timed"
    for x in ok:
        assert x["kernel_ms"] > 0 and x["context"]["device"] == DEVICE_NAME and x["context"]["tiny"] is True
        assert x["family"] == family and x["case"] and x["label"]
    assert all(x.get("reason") for x in lines if x["status"] == "skipped")
    if family != "flex":  # flex has no contender of ours
        assert any(x["label"].startswith("janus_fast") for x in ok), f"{family}: ours was never timed"
    timed = {x["label"] for x in ok}
    if family == "generation":  # the peers that need nothing beyond the test extras
        assert {"plain torch, one CUDA graph per step", "official loop (transformers Llama)",
                "transformers Janus"} <= timed
    if family == "vq":
        assert {"bf16", "fp32"} <= {x["case"].split(", ")[-1].split()[0] for x in ok}
    if family == "attention":
        assert {"sdpa-flash", "sdpa-flash (padded)"} <= timed  # the CPU has SDPA's flash kernel


@pytest.mark.parametrize("family", MISSING or [pytest.param("none", marks=pytest.mark.skip("every family exists"))])
def test_missing_family_is_one_skipped_line(tiny_run, family):
    (line,) = lines_of(tiny_run, family)
    assert line["status"] == "skipped" and "does not exist" in line["reason"]


def test_render_merges_every_family(tiny_run):
    output = tiny_run / "RESULTS.md"
    files = sorted(str(p) for p in tiny_run.glob("*.jsonl"))
    assert render.main([*files, "-o", str(output)]) == 0
    text = output.read_text()
    assert "## Summary: ours against the best peer" in text
    if not torch.cuda.is_available():
        assert "CPU results" in text and "not judged (CPU)" in text
    for family in PRESENT:
        assert f"## {'attention' if family == 'flex' else family}" in text
    assert "| flex |" in text.split("## attention")[1].splitlines()[4]  # flex's column joins the attention table
    assert "## Runs" in text and "python -m janus_fast.bench --tiny" in text
    summary = text.split("## Summary")[1].split("\n## ")[0]
    assert "| speed-up | H100 target |" in summary
    if not torch.cuda.is_available():  # no ratio from host-clock timings of tiny shapes
        assert "×" not in summary and "not judged (CPU)" in summary
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for table in {"attention" if f == "flex" else f for f in PRESENT}:
        assert (tiny_run / f"RESULTS-{table}.png").stat().st_size > 1000
    one = tiny_run / "one" / "RESULTS.md"
    assert render.main([*files, "-o", str(one), "--one-chart"]) == 0
    assert one.with_suffix(".png").stat().st_size > 1000 and "![every table](RESULTS.png)" in one.read_text()
    assert sorted(p.name for p in one.parent.iterdir()) == ["RESULTS.md", "RESULTS.png"]


GPU = {"device": "NVIDIA H100 80GB HBM3", "commit": "abc", "dirty": False, "command": "python -m janus_fast.bench"}


def cell(case, label, ms, status="ok", **extra):
    return {"family": "attention", "table": "attention", "case": case, "label": label, "status": status,
            "kernel_ms": ms, "context": GPU, **extra}


def test_render_summary_ratio_target_and_reasons(tmp_path):
    lines = [
        cell("S4096", "janus_fast triton", 0.5, tflops=600.0, target={"metric": "tflops", "at_least": 560}),
        cell("S4096", "sdpa-cudnn", 0.6, tflops=500.0),
        cell("S4096", "sdpa-flash", 0.75, tflops=400.0),
        cell("decode", "janus_fast triton", 0.2, target={"metric": "kernel_us", "at_most": 120}, call_ms=0.25),
        cell("decode", "sdpa-flash", None, status="skipped", reason="needs 99 GiB; 70 GiB free"),
        cell("decode", "sdpa-flash", 0.3),  # a later timed line wins over a skipped one
        cell("decode", "sdpa-cudnn", None, status="failed", reason="boom"),
        cell("decode", "sdpa-efficient", 0.4, kernel_timing="eager calls (graph capture failed: sync)"),
    ]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"cut by a ki\n")
    text = render.render(render.read_lines([path]))
    assert ("| attention | S4096 | janus_fast triton 500 µs | sdpa-cudnn 600 µs | 1.2× | ≥ 560 TFLOP/s "
            "| 600 TFLOP/s: met |") in text
    assert ("| attention | decode | janus_fast triton 200 µs | sdpa-flash 300 µs | 1.5× | ≤ 120 µs "
            "| 200 µs: missed |") in text
    assert "200 µs · call 250 µs" in text and "failed [1]" in text and "1. boom" in text
    assert "400 µs [2]" in text and "2. eager calls (graph capture failed: sync)" in text
    assert "CPU results" not in text and "skipped" not in text


def test_render_writes_beside_its_inputs_by_default(tmp_path):
    # The README's Benchmarks commands never touch the committed benchmarks/RESULTS.md: without
    # -o the report goes beside the first input file.
    lines = tmp_path / "results" / "vq.jsonl"
    lines.parent.mkdir()
    lines.write_text(json.dumps(cell("S", "janus_fast triton", 0.5)) + "\n")
    assert render.main([str(lines)]) == 0
    assert "janus_fast triton" in (tmp_path / "results" / "RESULTS.md").read_text()
    readme = (REPO / "README.md").read_text().split("## Benchmarks")[1].split("```bash")[1].split("```")[0]
    assert "render.py" in readme and "benchmarks/RESULTS.md" not in readme


def test_the_generation_headline_is_the_median_of_three_batches():
    from benchmarks import bench_generation as g

    assert g.timed_runs(g.OURS, "1b", 16, warm_up_s=30) >= 3 and g.timed_runs(g.OURS, "7b", 16, 30) >= 3
    assert g.timed_runs(g.GRAPH_PEER, "1b", 16, warm_up_s=30) == 1 and g.timed_runs(g.OURS, "1b", 16, 1) == 3


def test_bench_exits_non_zero_when_ours_cannot_run(monkeypatch, capsys):
    import janus_fast

    info = janus_fast.backends()
    monkeypatch.setattr(janus_fast, "backends", lambda: {**info, "triton": None})
    assert bench.main(["--family", "vq", "--out", "unused"]) == 2
    assert "janus_fast's own contenders cannot run here: triton is not installed" in capsys.readouterr().err
    monkeypatch.setattr(janus_fast, "backends", lambda: {**info, "cuda_extension": False, "triton_interpreter": False,
                                                         "cuda_extension_error": "janus_fast._C is not built"})
    assert "janus_fast._C is not built: build it with" in bench.ours_unusable(cuda=True)
    assert bench.ours_unusable(cuda=False) is None  # without CUDA, the interpreter runs ours


def test_a_family_where_ours_was_never_timed_is_named():
    def line(family, label, status, reason=None):
        return {"family": family, "label": label, "status": status, "reason": reason}
    lines = [line("vq", "torch", "ok"), line("vq", "janus_fast triton", "skipped", "janus_fast triton backend "
                                                                              "unavailable here: boom"),
             line("sampling", "janus_fast triton", "ok"), line("flex", "flex", "ok"),
             line("training", "janus_fast", "skipped", "the family's time budget (5 s, --budget) was used up")]
    assert bench.ours_missing(["vq", "sampling", "flex", "training"], lines) == [
        "vq: janus_fast triton backend unavailable here: boom"]


def test_budget_skips_with_reason(monkeypatch):
    monkeypatch.setenv("JANUS_FAST_BENCH_BUDGET", "0")
    harness.begin_test("vq")
    with pytest.raises(pytest.skip.Exception, match="time budget"):
        harness.declare("case", "label")
    harness.take_records()


def test_runner_passes_pytest_arguments_through():
    args, extra = bench.parse(["--family", "vq", "-k", "lookup", "--out", "d", "-x"])
    assert args.family == ["vq"] and args.out == "d" and extra == ["-k", "lookup", "-x"]


def test_sort_based_peer_samples_inside_both_filters():
    torch.manual_seed(0)
    logits = torch.randn(8, 300)
    guided = logits[1::2] + 5.0 * (logits[0::2] - logits[1::2])
    top = guided.topk(5)
    allowed = top.indices
    # top-p 0.6 over the renormalised top 5 keeps ranks whose mass before them is < 0.6
    nucleus = (top.values.softmax(-1).cumsum(-1) < 0.6).sum(-1) + 1
    for _ in range(20):
        ids = peers.torch_filtered_cfg_sample(logits, 5.0, top_k=5, top_p=0.6)
        ranks = (allowed == ids[:, None]).float().argmax(-1)
        assert (allowed == ids[:, None]).any(-1).all() and (ranks < nucleus).all()


def test_generation_peers_run_our_model():
    """The official loop's transformers Llama holds our LLM's tensors and computes what ours
    does; the plain-torch graph peer's static-cache forward computes the same, prefill and a
    decode step."""
    from benchmarks import generation_peers as gp
    from janus_fast.models.random_model import random_model

    model = random_model("tiny", "cpu", torch.float32, seed=0)
    llm = gp.hf_llama(model)
    assert llm.model.layers[0].self_attn.q_proj.weight.data_ptr() == \
        model.language_model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    ids = gp.prompt_ids(model, "A red fox")
    tokens = torch.tensor(ids).repeat(4, 1)
    tokens[1::2, 1:-1] = model.processor.pad_id
    with torch.no_grad():
        want = model.language_model.model(input_ids=tokens).last_hidden_state
        torch.testing.assert_close(llm.model(input_ids=tokens).last_hidden_state, want, rtol=1e-4, atol=1e-5)
        peer = gp.StaticGraphPeer(llm, model, len(ids), parallel_size=2)
        prefill = peer._llm(llm.get_input_embeddings()(tokens[:, :-1]))
        step = peer._llm(llm.get_input_embeddings()(tokens[:, -1:]))
    torch.testing.assert_close(prefill, want[:, -2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step, want[:, -1], rtol=1e-4, atol=1e-5)


def test_failures_and_skips_become_lines_with_their_reason(tmp_path):
    """A case that raises or skips is written with its cell and reason, next to timed ones."""
    (tmp_path / "bench_demo.py").write_text(
        "import pytest\n"
        "from benchmarks import harness\n"
        "@pytest.mark.parametrize('impl', ['raises', 'skips', 'times'])\n"
        "def test_case(impl):\n"
        "    harness.declare('case one', impl)\n"
        "    if impl == 'raises':\n"
        "        raise ValueError('boom here')\n"
        "    if impl == 'skips':\n"
        "        pytest.skip('no such kernel here')\n"
        "    harness.keep('case one', impl, 2.0, 'host clock')\n")
    env = {**os.environ, "JANUS_FAST_BENCH_OUT": str(tmp_path), "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.conftest",
                    str(tmp_path / "bench_demo.py")], cwd=tmp_path, env=env, capture_output=True, timeout=300)
    lines = {x["label"]: x for x in lines_of(tmp_path, "demo")}
    assert lines["raises"]["status"] == "failed" and lines["raises"]["reason"] == "ValueError: boom here"
    assert lines["skips"]["status"] == "skipped" and lines["skips"]["reason"] == "no such kernel here"
    assert lines["times"]["status"] == "ok" and lines["times"]["kernel_ms"] == 2.0
    assert all(x["case"] == "case one" and x["family"] == "demo" for x in lines.values())
