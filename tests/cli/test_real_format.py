"""The step between the synthetic demo and a pod, walked through the console script with files in the
exact published formats: DAPO-Math-17k's parquet, an AIME file in verl's layout with every problem
repeated, MATH-500's plain problem/answer JSONL, and a checkpoint directory with every file a Qwen3 one
has (byte-level BPE tokenizer with Qwen3's special tokens and chat template, generation_config.json,
a tiny Qwen3 saved by transformers).

    prepare-data (MATH-500 → verl) → convert --hf → train (the 8B preset's algorithm at tiny widths)
    → eval (k = 4, the AIME file scored as its distinct problems) → convert --to_hf
    → the export loads in transformers, whose greedy `generate` gives our engine's greedy tokens.

Oracles: the published prompt text written by hand in `fixtures/real_format.py`, a hand count of the
AIME file's distinct problems, and HF transformers' own tokenizer and `generate`.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, metrics_rows, real_format

pytestmark = pytest.mark.slow  # end to end: five CLI processes

K = 4
AIME_DISTINCT = 3          # by hand: real_format.AIME_PROBLEMS holds three problems, each written 32 times
MAX_NEW = 16
# the paper's config (configs/qwen3_8b_dapo.py: DAPO loss, clip-higher, dual clip, anchors = lowest 20% of
# attention entropy at the probe layer, head-mixture entropy, remat, FSDP) at the tiny model's widths;
# dynamic sampling is off because a random model's groups are all wrong (it would stop the run, by design),
# the probe layer is the XLA path and the compute f32 (the Pallas kernel and bf16 have tests of their own)
PAPER = [f"--config={REPO_ROOT}/configs/qwen3_8b_dapo.py:anchor"]
TINY = ["--config.entropy.layers=(1,)", "--config.model.dtype=float32", "--config.model.probe_attention=xla",
        "--config.data.max_prompt_len=128", f"--config.rollout.max_new_tokens={MAX_NEW}",
        "--config.rl.overlong_buffer=4", "--config.rl.prompts_per_step=4", "--config.rl.group_size=4",
        "--config.rl.mini_batch_prompts=2", "--config.rl.micro_batch_size=8", "--config.rl.dynamic_sampling=False",
        "--config.model.logits_chunk=64", "--config.train.geometry_every=0", "--config.train.progress=False",
        "--config.eval.every=0"]


def _cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    """`jaxrl-entropy ARGS` from a scratch directory, with this checkout's package and the session's
    devices and compilation cache (conftest)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxrl_entropy.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"jaxrl-entropy {args[0]} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def walk(tmp_path_factory, real_format_files, tiny_qwen3_dir):
    """Every command of the walk, in order; their outputs for the tests below."""
    hf, ids = tiny_qwen3_dir
    d = tmp_path_factory.mktemp("walk")
    math500 = str(d / "math500.parquet")
    out = {"hf": hf, "ids": ids, "dir": d, "math500": math500, "run": str(d / "run"), "export": str(d / "export")}
    out["prepare"] = _cli(["prepare-data", f"--in={real_format_files['math500']}", f"--out={math500}",
                           "--prompt_key=problem", "--answer_key=answer", "--prompt_template=dapo",
                           "--data_source=math500"], d)
    data = [f"--config.model.hf_dir={hf}", f"--config.data.train_files={real_format_files['dapo']}",
            f"--config.eval.benchmarks=aime24={real_format_files['aime']},math500={math500}"]
    _cli(["convert", f"--hf={hf}", f"--to_orbax={out['run']}", *PAPER, *data, *TINY], d)
    out["train"] = _cli(["train", f"--workdir={out['run']}", *PAPER, *data, *TINY, "--config.train.steps=2"], d)
    out["eval"] = _cli(["eval", f"--checkpoint={out['run']}", f"--config.eval.k={K}", f"--out={d / 'eval.json'}"], d)
    out["metrics"] = json.loads((d / "eval.json").read_text())
    _cli(["convert", f"--checkpoint={out['run']}", f"--to_hf={out['export']}"], d)
    return out


def test_prepare_data_writes_math500_in_verl_layout_with_the_paper_prompt(walk):
    rows = pq.read_table(walk["math500"]).to_pylist()
    assert [r["prompt"] for r in rows] == [[{"content": real_format.dapo_prompt(r["problem"]), "role": "user"}]
                                           for r in real_format.MATH500_ROWS]
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["11", "4", "\\frac{3}{4}"]
    assert {r["data_source"] for r in rows} == {"math500"} and {r["ability"] for r in rows} == {"MATH"}
    assert "wrote 3 rows (3 distinct prompts" in walk["prepare"].stdout


def test_train_runs_the_paper_algorithm_on_dapo_math_rows(walk):
    rows = [r for r in metrics_rows(walk["run"]) if "loss" in r]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["loss"]) and r["skipped_updates"] == 0 for r in rows)
    # anchors: the 20% of response tokens with the lowest attention entropy
    assert all(r["weights/selected_frac"] == pytest.approx(0.2, abs=0.05) for r in rows)
    assert rows[0]["data/prompts_truncated"] == 0 and rows[0]["data/prompts_dropped"] == 0
    assert sorted(os.listdir(os.path.join(walk["run"], "checkpoints")))[-1] == "2"


def test_eval_scores_each_distinct_aime_problem_with_k_samples(walk):
    m = walk["metrics"]
    assert set(m) == {f"eval/{b}/{s}@{K}" for b in ("aime24", "math500") for s in ("mean", "pass")} | {"eval/accuracy"}
    rows = real_format.AIME_REPEATS * AIME_DISTINCT
    assert re.search(rf"eval set aime24: {rows} rows, {AIME_DISTINCT} distinct problems; each is scored once "
                     rf"with eval.k={K} samples", walk["eval"].stderr), walk["eval"].stderr[-2000:]
    # mean@k is a mean over distinct problems × k samples: a whole number of correct samples
    correct = m[f"eval/aime24/mean@{K}"] * AIME_DISTINCT * K
    assert correct == pytest.approx(round(correct), abs=1e-6)


def test_the_export_loads_in_transformers_and_generates_our_greedy_tokens(walk, torch):
    import jax
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxrl_entropy.data.pipeline import PromptEncoder
    from jaxrl_entropy.models.sampler import SamplingParams
    from jaxrl_entropy.training import model_io, model_setup
    from jaxrl_entropy.training.rollout import PolicySampler

    ids = walk["ids"]
    export = walk["export"]
    generation = json.load(open(os.path.join(export, "generation_config.json")))
    assert sorted(generation["eos_token_id"]) == sorted([ids["<|im_end|>"], ids["<|endoftext|>"]])
    hf_tok = AutoTokenizer.from_pretrained(export)
    hf_model = AutoModelForCausalLM.from_pretrained(export).eval()  # float32: the export stores f32

    cfg, policy, step, tokenizer = model_io.policy_from_run(None, walk["run"])
    assert step == 2
    prompts = [real_format.dapo_prompt(q) for q, _ in real_format.AIME_PROBLEMS]
    records = [{"prompt": [{"role": "user", "content": p}], "reward_model": {"ground_truth": "0"},
                "data_source": "aime24"} for p in prompts]
    encoder = PromptEncoder(records, tokenizer, max_prompt_len=cfg.data.max_prompt_len)
    batch = [encoder(i) for i in range(len(records))]
    eos = model_setup.eos_ids(tokenizer, policy.arch)
    out = PolicySampler(policy, cfg)(
        policy.params, np.stack([b["input_ids"] for b in batch]), np.stack([b["attention_mask"] for b in batch]),
        jax.random.key(0), SamplingParams(MAX_NEW, temperature=0.0, eos_ids=eos, pad_id=tokenizer.pad_token_id))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    finished = np.asarray(out.finished)
    assert finished.any() and not finished.all()  # both ways of ending: an eos (where HF stops too), the limit
    for i, prompt in enumerate(prompts):
        hf_ids = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        ours = batch[i]["input_ids"][batch[i]["attention_mask"] == 1]
        assert list(ours) == list(hf_ids)  # the same prompt tokens: tokenizer and chat template
        with torch.no_grad():  # the export's own generation_config.json decides where it stops
            ref = hf_model.generate(torch.tensor([hf_ids]), do_sample=False, max_new_tokens=MAX_NEW,
                                    top_p=None, top_k=None, temperature=None)[0, len(hf_ids):].tolist()
        assert tokens[i, :lengths[i]].tolist() == ref, (i, tokens[i].tolist(), ref)
