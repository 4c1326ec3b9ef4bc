"""Benchmark of MR-SP vs the naive RL loop: rl.py --loop=mrsp vs --loop=naive, side by side, at several frame counts.

    python bench/bench_mrsp.py                                  # 64..1024 frames, 3 steps each (~6-9 min, 2 cores)
    python bench/bench_mrsp.py --frames=64,128 --steps=2 --cached=0 --calibrate=0   # smoke run (~1 min)
    python bench/bench_mrsp.py --vision=tiny --frames=512      # sensitivity: the embedded tiny model (heavier vision)
    python bench/bench_mrsp.py --mem_budget_gb=1.0              # mark measured runs whose peak RSS is over 1 GB
    python bench/bench_mrsp.py --nproc=2 --frames=512,1024,2048 --video_frames=2048 --cached=0 --calibrate=0 \
        --out=out/bench_mrsp_sp2                                # 2 processes: naive DP=2 vs MR-SP SP=2 (~11 min)

What it does: builds a synthetic long-video set (every video 1,024 frames at 56x56) and a random-init Qwen2.5-VL
checkpoint under --out, then, for each frame count, runs `python rl.py` as separate processes with the same seed,
prompts and rollout seeds: --loop=naive (naive: no cache; the vision tower re-encodes the video for every rollout request
and inside every old-policy / reference / training forward: 4*G vision passes per prompt; no SP), --loop=mrsp (each
video encoded once, its cached embeddings reused everywhere: 1 pass per prompt), and optionally --loop=mrsp over
videos repeated every step (cache hits: 0 encodes after step 1). Runs are interleaved per frame count (the order
alternates) so drifting outside load hits both loops alike. Each step of the main runs draws NEW videos
(steps * prompts_per_step distinct videos): like the paper's step, each video is encoded once per step by MR-SP.
Step 1 is a warm-up and is left out of the means.

--nproc=N runs every rl.py under torchrun on N processes, as the paper compares on 8 GPUs: the naive loop data-parallel
(--sp=1, DP=N: a whole sequence per rank, each rank its own prompts) vs MR-SP sequence-parallel (--sp=N: every
sequence split over the N ranks for the prefills and training, video encodes split too). Same total work per step,
so the step times compare directly; the per-rank peak memory shows what sequence parallelism adds on top of the cache.

Reported per frame count: s/step of both loops and the speed-up, as wall clock (rl.py's step_time) and as CPU time
of the run's processes per step (read from /proc between metrics rows: robust to other jobs on a shared machine), the
rl.py time split (wall: encode / rollout / prefill / train), vision-tower passes per step, peak memory (ru_maxrss
of the fullest rank's process, measured), whether the two loops drew the same tokens; and, from
estimate.estimate_memory, the per-GPU peak of Qwen2.5-VL-7B RL on 8 GPUs for the naive loop (SP=1: a whole sequence per
GPU) vs MR-SP (SP=8), against --gpu_mem_gib (estimated, not measured). Rows are also written to {out}/results.json.

Sizing the bench model's vision tower (--vision=7b, the default). MR-SP's gain comes from the vision passes it
saves, so what matters is the cost of one video encode relative to one LLM forward over the sequence,
r = vision FLOPs per video / LLM forward FLOPs per sequence. For Qwen2.5-VL-7B (0.68B-param ViT, 32 blocks, width
1280, run on 4 patches per LLM video token; 7.6B-param LLM, 28 layers, width 3584) at 336x336 (144 tokens per
2 frames: the paper's ~256k tokens at 3,600 frames), a 256-token prompt and a 1,024-token response (the
estimate_memory defaults), counting 2 FLOPs per multiply-add of every linear layer and of the attention
(causal in the LLM, window / per-frame-pair in the ViT):
    ViT per video   = 2*(patch embed + 32 blocks)*patches + 2*merger*tokens + attention
    LLM per seq     = 2*(28 layers)*N + 2*N^2*3584*28 + 2*lm_head*response      (N = video + prompt + response)
    r_7B = 0.28, 0.30, 0.29, 0.24, 0.18 at 64, 128, 256, 512, 1024 frames
(the ViT does ~0.39x the LLM's linear work per token; the LLM's attention, quadratic in N, lowers r at long N).
On GPU both are compute bound, so r_7B is also their time ratio. The embedded tiny model (prepare.TINY_VISION /
TINY_TEXT) is far off: its vision encode takes ~1.6x an LLM forward on this CPU, 6.5x the 7B's share (FLOPs ~1x):
its ViT runs on 4 patches per LLM token, and at width 64 the 1176->64 patch embedding alone does ~3/4 of the linear
work per token of its 2-layer, width-128 LLM. So the bench model is the
tiny one with a LARGER LLM (width 256, 3 layers) and a SMALLER vision tower (1 block, width 40, ~0.13M params),
chosen so that its measured CPU time ratio matches r_7B: 0.23-0.31 at 64-1024 frames in the recorded run
(--calibrate prints it, thread CPU time, next to r_7B; its FLOP ratio is lower, 0.07-0.09, because the tiny vision
matmuls and its per-frame-pair attention calls run slower per FLOP on this CPU than the LLM's).
With r ~ 0.25 and G=5 the cache alone cannot reach 2.1x (see the cost model printed at the end); --vision=tiny
shows the speed-up with the tiny model's 6.5x heavier vision share.
"""
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")   # the rl.py subprocesses inherit it: one thread each

import torch  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402
import estimate  # noqa: E402
import prepare  # noqa: E402

# -----------------------------------------------------------------------------
# config (override with --key=value)
out = os.path.join(ROOT, "out", "bench_mrsp")   # scratch: data, checkpoint, rl.py runs, results.json
frames = "64,128,256,512,1024"   # frame counts to sweep (each <= video_frames)
steps = 3                  # RL steps per run; the first `warmup` are left out of the means
warmup = 1
prompts_per_step = 2       # videos per step (each step draws new ones in the main runs)
group_size = 5             # G rollouts per prompt (paper release: 5)
max_new_tokens = 32        # response budget (random-init model: most responses run to it)
kl_coef = 1e-2             # k3 KL on: the reference prefill exists, as in the paper
vision = "7b"              # 7b: bench model sized to the 7B's vision/LLM cost share | tiny: prepare.init_tiny as is
cached = True              # also run MR-SP over videos repeated every step (cache hits, 0 encodes after step 1)
calibrate = True           # measure the bench model's vision/LLM time ratio per frame count (thread CPU time)
mem_budget_gb = 0.0        # measured peak RSS budget per run (GB); runs above it are marked "OOM at budget"; 0 = off
gpu_mem_gib = 80.0         # estimated part: per-GPU memory of the 7B runs (paper: 8x A100 80GB)
video_frames = 1024        # frames of every synthetic video (56x56, 8 fps)
nproc = 1                  # processes per rl.py run: 1 = no SP; N > 1 = torchrun, naive DP=N vs MR-SP SP=N
run_timeout = 1800         # seconds per rl.py run
seed = 0

# The bench model (vision="7b"): the embedded tiny model with a wider, deeper LLM and a lighter vision tower, so that
# one video encode costs ~0.25x one LLM forward over the sequence on this CPU, like Qwen2.5-VL-7B (docstring).
BENCH_TEXT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, layer_types=["full_attention"] * 3,
                  rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[8, 12, 12]))  # head_dim 64
BENCH_VISION = dict(depth=1, hidden_size=40, intermediate_size=80, num_heads=2, out_hidden_size=256,
                    fullatt_block_indexes=[0])
SIZE = 56                  # = prepare.TINY_PIXELS ** 0.5: the tiny processor resizes every frame to 56x56
EST_EXTRA_FRAMES = (2048, 3600)   # estimated part also goes past the measured frames, to the paper's 3,600


# -----------------------------------------------------------------------------
# data + checkpoint
def make_data(root, n_train):
    """Synthetic long videos ({root}/train.jsonl, n_train videos of video_frames frames) and repeat.jsonl (the first
    prompts_per_step records: every step sees the same videos, for the cached-across-steps run)."""
    meta = os.path.join(root, "meta.json")
    want = dict(n_train=n_train, num_frames=video_frames, size=SIZE, seed=seed)
    if os.path.isfile(meta):
        with open(meta) as f:
            have = json.load(f)
        if all(have.get(k) == v for k, v in want.items()):
            return
    shutil.rmtree(root, ignore_errors=True)
    prepare.generate_synthetic(root, n_train=n_train, n_val=0, n_test=0, num_frames=video_frames, size=SIZE,
                            seed=seed, progress=False)
    with open(os.path.join(root, "train.jsonl")) as f:
        lines = f.readlines()[:prompts_per_step]
    with open(os.path.join(root, "repeat.jsonl"), "w") as f:
        f.writelines(lines)


def make_model(path, train_file):
    """prepare.init_tiny (tokenizer, processor, chat template, special ids), then for vision="7b" the model re-initialised
    from the same config with BENCH_TEXT / BENCH_VISION (prepare.py itself is left alone)."""
    marker = os.path.join(path, "bench_model.json")
    spec = dict(vision=vision, text=BENCH_TEXT, vision_config=BENCH_VISION, seed=seed)
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                return
    shutil.rmtree(path, ignore_errors=True)
    prepare.init_tiny(path, train_file, seed)
    if vision == "7b":
        from transformers import AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration
        config = AutoConfig.from_pretrained(path)
        for k, v in BENCH_TEXT.items():
            setattr(config.text_config, k, v)
        for k, v in BENCH_VISION.items():
            setattr(config.vision_config, k, v)
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
        model.generation_config = GenerationConfig.from_pretrained(path)
        model.save_pretrained(path)
    with open(marker, "w") as f:
        json.dump(spec, f)


# -----------------------------------------------------------------------------
# cost share: FLOPs (7B and bench model) and measured CPU time (bench model)
def forward_flops(raw, n_frames, height, width, prompt_tokens, response_tokens):
    """-> (vision FLOPs of one video encode, LLM FLOPs of one forward over video + prompt + response tokens, video
    tokens). 2 FLOPs per multiply-add; linear layers, attention (ViT: windows of window_size px, full attention within
    a frame pair in fullatt blocks; LLM: causal) and, in the LLM, the LM head on the response only (the log-prob
    prefill scores only those)."""
    _, c = estimate.load_estimate_config(raw)
    t, v = c["text"], c["vision"]
    vraw = raw["vision_config"]
    p, m, tp = v["patch_size"], v["spatial_merge_size"], v["temporal_patch_size"]
    n_tok = estimate.video_tokens(n_frames, height, width, p, m, tp)
    patches = n_tok * m * m
    h, Iv, depth = v["hidden_size"], v["intermediate_size"], v["depth"]
    block = 4 * h * h + (3 if v["gated"] else 2) * h * Iv                  # qkv + proj, (SwiGLU) MLP
    embed = 3 * tp * p * p * h                                              # Conv3d patch embedding
    merger = (h * m * m) ** 2 + h * m * m * v["out_hidden_size"]
    frame_patches = estimate.video_tokens(tp, height, width, p, m, tp) * m * m  # patches of one temporal patch
    win = min((vraw.get("window_size", 112) // p) ** 2, frame_patches)
    n_full = len(vraw.get("fullatt_block_indexes", []))
    attn = 4 * h * patches * (win * (depth - n_full) + frame_patches * n_full)
    vis = 2 * (embed + depth * block) * patches + 2 * merger * n_tok + attn
    N = n_tok + prompt_tokens + response_tokens
    _, _, p_layer, p_emb = estimate.param_counts(c)
    L, q = t["num_hidden_layers"], t["num_attention_heads"] * t["head_dim"]
    llm = 2 * p_layer * L * N + 2 * N * N * q * L + 2 * p_emb * response_tokens
    return vis, llm, n_tok


def ratio_7b(n_frames):
    """Qwen2.5-VL-7B at 336x336 (the estimator's default: ~256k tokens at 3,600 frames), 256 prompt + 1,024 response
    tokens (the estimate_memory defaults) -> vision FLOPs per video / LLM forward FLOPs per sequence."""
    vis, llm, _ = forward_flops(estimate.QWEN25_VL_7B, n_frames, estimate.DEFAULT_SIZE, estimate.DEFAULT_SIZE, 256, 1024)
    return vis / llm


def calibration(model_dir, train_file, frame_list, reps=5):
    """Per frame count: thread CPU time (min of reps; robust to the other load on a shared machine) of one video
    encode, one no-grad LLM log-prob forward over [video + prompt + max_new_tokens response] (the old/ref prefill),
    and one forward + backward (a training forward); their ratio next to the FLOP ratios of the bench model and 7B."""
    from mrsp import encode_videos, load_model, sp_logprobs
    model, processor = load_model(model_dir)
    model.eval()
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    rec = data.load_records(train_file)[0]
    gen = torch.Generator().manual_seed(seed)

    def best(fn):
        ts = []
        for _ in range(reps):
            t = time.thread_time()
            fn()
            ts.append(time.thread_time() - t)
        return min(ts)

    rows = []
    for F in frame_list:
        frames_, info = data.load_video(rec["video"], num_frames=F)
        pv = data.process_video(processor, frames_, info)
        with torch.no_grad():
            emb = encode_videos(model, pv["pixel_values_videos"], pv["video_grid_thw"])
            t_enc = best(lambda: encode_videos(model, pv["pixel_values_videos"], pv["video_grid_thw"]))
        tx = data.encode_text(processor, rec, pv["video_grid_thw"], with_target=False)
        resp = torch.randint(20, len(processor.tokenizer) - 20, (max_new_tokens,), generator=gen)
        ids = torch.cat([tx["input_ids"], resp])
        mask = torch.zeros(ids.numel(), dtype=torch.bool)
        mask[-max_new_tokens:] = True
        seq = dict(input_ids=ids, mm_token_type_ids=torch.cat([tx["mm_token_type_ids"], torch.zeros_like(resp)]),
                   loss_mask=mask, video_grid_thw=pv["video_grid_thw"], second_per_grid_ts=pv["second_per_grid_ts"],
                   embeds=emb)
        with torch.no_grad():
            t_llm = best(lambda: sp_logprobs(model, seq))
        t_fb = best(lambda: sp_logprobs(model, seq).sum().backward())
        model.zero_grad(set_to_none=True)
        n_video = int((tx["mm_token_type_ids"] == 2).sum())
        vis, llm, _ = forward_flops(raw, F, SIZE, SIZE, ids.numel() - n_video - max_new_tokens, max_new_tokens)
        rows.append(dict(frames=F, seq_tokens=ids.numel(), video_tokens=n_video, t_encode=t_enc, t_llm_fwd=t_llm,
                         t_llm_fwd_bwd=t_fb, r_time=t_enc / t_llm, r_flops=vis / llm, r_flops_7b=ratio_7b(F)))
        print(f"  calibrated {F} frames: encode {t_enc * 1e3:.1f} ms, LLM fwd {t_llm * 1e3:.1f} ms "
              f"(r {t_enc / t_llm:.2f}; 7B {ratio_7b(F):.2f})", flush=True)
    del model
    return rows


# -----------------------------------------------------------------------------
# one rl.py run
def cpu_seconds(pid):
    """user + system CPU time of a live process (all its threads) and of its live descendants (torchrun's workers),
    from /proc (Linux); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime, stime
    except (OSError, IndexError, ValueError):
        return None
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except (OSError, ValueError):
        pass
    return total + sum(c for c in map(cpu_seconds, kids) if c is not None)


def run_rl(tag, model_dir, data_file, F, mode):
    """python rl.py ... in its own process (so ru_maxrss is this run's peak) -> dict(rows=metrics.jsonl rows,
    cpu_at_row, wall, rc, cmd). The out_dir is wiped first: metrics.jsonl is appended to.

    Besides rl.py's wall-clock step_time, the run's CPU time is read from /proc every 20 ms and noted each time
    metrics.jsonl gains a row (rl.py flushes one row at the end of every step): CPU s of step k = cpu_at_row[k] -
    cpu_at_row[k-1]. With one compute thread (OMP_NUM_THREADS=1) that is the step's own work, which time slices
    taken by other jobs on a shared machine do not inflate (wall clock does)."""
    run_dir = os.path.join(out, "runs", f"{tag}_f{F}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    cmd = launch + [os.path.join(ROOT, "rl.py"), f"--model={model_dir}", f"--data={data_file}",
           "--val_data=", f"--out_dir={run_dir}", f"--frames={F}", f"--steps={steps}",
           f"--prompts_per_step={prompts_per_step}", f"--group_size={group_size}",
           f"--max_new_tokens={max_new_tokens}", f"--kl_coef={kl_coef}", f"--loop={'naive' if mode == 'naive' else 'mrsp'}",
           f"--seed={seed}", f"--save_every={steps + 1000}", f"--log_every={steps + 1000}",
           f"--sp={1 if mode == 'naive' else nproc}"]   # naive: DP over the processes; MR-SP: one SP group
    log = os.path.join(run_dir, "log.txt")
    path = os.path.join(run_dir, "metrics.jsonl")
    t0, cpu_at_row, rc = time.time(), [], None
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        while rc is None:
            cpu = cpu_seconds(proc.pid)
            if os.path.isfile(path):
                with open(path) as m:
                    n = sum(1 for line in m if line.endswith("\n"))
                cpu_at_row += [cpu] * (n - len(cpu_at_row))   # a row appeared since the last poll
            if time.time() - t0 > run_timeout:
                proc.kill()
                proc.wait()
                rc = "timeout"
                break
            time.sleep(0.02)
            rc = proc.poll()
    wall = time.time() - t0
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-2000:]
        print(f"  {tag} {F} frames: rl.py failed (rc {rc}); log {log}:\n{tail}", flush=True)
    return dict(rows=rows, cpu_at_row=cpu_at_row, wall=wall, rc=rc, cmd=" ".join(cmd[1:]))


PHASES = ("t_encode", "t_rollout", "t_prefill", "t_train", "t_sync")


def summarize(run):
    """Means over the timed steps (after warm-up) of step time (wall and CPU), phases and vision passes; peak RSS
    over all steps."""
    rows, cpu = run["rows"], run["cpu_at_row"]
    if len(rows) < steps or len(cpu) < len(rows):
        return None
    timed = rows[warmup:]
    mean = lambda k: sum(r[k] for r in timed) / len(timed)
    cpu_steps = [cpu[k] - cpu[k - 1] if None not in (cpu[k], cpu[k - 1]) else float("nan")
                 for k in range(warmup, len(rows))]
    s = dict(step_s=mean("step_time"), cpu_s=sum(cpu_steps) / len(cpu_steps), **{k: mean(k) for k in PHASES},
             vision_passes=mean("vision_passes"), peak_gb=max(r["peak_mem_gb"] for r in rows),
             timed_steps=len(timed), wall=run["wall"], step_times=[r["step_time"] for r in rows],
             cpu_steps=cpu_steps)
    s["other"] = s["step_s"] - sum(s[k] for k in PHASES)
    if "cache_hits" in rows[-1]:
        s.update(cache_hits=rows[-1]["cache_hits"], cache_misses=rows[-1]["cache_misses"])
    s["over_budget"] = bool(mem_budget_gb) and s["peak_gb"] > mem_budget_gb
    return s


def same_tokens(a, b):
    """Both loops drew the same rollouts: equal mean response length and reward at every step."""
    ra, rb = a["rows"], b["rows"]
    return len(ra) == len(rb) > 0 and all(x["response_len"] == y["response_len"] and
                                          abs(x["reward_mean"] - y["reward_mean"]) < 1e-9 for x, y in zip(ra, rb))


# -----------------------------------------------------------------------------
# report
def split(s):
    return "/".join(f"{s[k]:.2f}" for k in ("t_encode", "t_rollout", "t_prefill", "t_train"))


def print_table(res):
    layout = "one process, no SP" if nproc == 1 else f"{nproc} processes: naive DP={nproc} vs MR-SP SP={nproc}"
    print(f"\n[1] RL step time, naive (--loop=naive) vs MR-SP (--loop=mrsp), {layout}, CPU; means over steps "
          f"{warmup + 1}..{steps}; every step new videos unless 'cached'; s/step and speed-up as wall / CPU time")
    head = ["frames", "video tok", "naive s/step", "MR-SP s/step", "speed-up"]
    head += ["MR-SP cached s/step", "cached speed-up"] if cached else []
    head += ["naive enc/roll/pre/train s", "MR-SP enc/roll/pre/train s", "vision passes/step naive / MR-SP"
             + (" / cached" if cached else ""), "peak GB naive / MR-SP" + (" / cached" if cached else ""),
             "same tokens"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in res:
        n, m, c = r["naive"], r["mrsp"], r.get("cached")
        if n is None or m is None:
            print(f"| {r['frames']} | {r['video_tokens']} | " + ("failed" if n is None else f"{n['step_s']:.2f}")
                  + " | " + ("failed" if m is None else f"{m['step_s']:.2f}") + " | - |")
            continue
        peak = lambda s: "-" if s is None else f"{s['peak_gb']:.2f}" + (" OOM at budget" if s["over_budget"] else "")
        secs = lambda s: f"{s['step_s']:.2f} / {s['cpu_s']:.2f}"
        up = lambda a, b: f"**{a['step_s'] / b['step_s']:.2f}x** / **{a['cpu_s'] / b['cpu_s']:.2f}x**"
        cells = [str(r["frames"]), str(r["video_tokens"]), secs(n), secs(m), up(n, m)]
        if cached:
            cells += ["-", "-"] if c is None else [secs(c), up(n, c)]
        vp = [n, m] + ([c] if cached else [])
        cells += [split(n), split(m), " / ".join("-" if s is None else f"{s['vision_passes']:g}" for s in vp),
                  " / ".join(peak(s) for s in vp), "yes" if r["same_tokens"] else "NO"]
        print("| " + " | ".join(cells) + " |")


def print_memory(res):
    """Peak per rank against the smallest frame count's: the growth is what the sequence costs (the runtime, the
    models and the optimizer are the same at every frame count), so its naive / MR-SP ratio says how many times more
    frames MR-SP fits into whatever memory is left, with no budget chosen."""
    rows = [r for r in res if r["naive"] and r["mrsp"]]
    if len(rows) < 2:
        return []
    b = rows[0]
    print(f"\n[1b] measured peak per rank (GB) and its growth over {b['frames']} frames; growth ratio = how many times "
          "more sequence memory the naive loop takes")
    print("| frames | naive peak | MR-SP peak | naive growth | MR-SP growth | growth naive / MR-SP |")
    print("|---|---|---|---|---|---|")
    out_rows = []
    for r in rows:
        gn, gm = r["naive"]["peak_gb"] - b["naive"]["peak_gb"], r["mrsp"]["peak_gb"] - b["mrsp"]["peak_gb"]
        ratio = f"{gn / gm:.1f}x" if r is not b and gm > 0.01 else "-"
        print(f"| {r['frames']} | {r['naive']['peak_gb']:.2f} | {r['mrsp']['peak_gb']:.2f} | {gn:+.2f} | {gm:+.2f} | "
              f"{ratio} |")
        out_rows.append(dict(frames=r["frames"], naive_gb=r["naive"]["peak_gb"], mrsp_gb=r["mrsp"]["peak_gb"],
                             naive_growth=gn, mrsp_growth=gm))
    # every budget between the smallest and the largest measured peak, not one picked to tell a story
    lo, hi = min(r["naive"]["peak_gb"] for r in rows), max(r["naive"]["peak_gb"] for r in rows)
    print("\nframes that fit a per-rank memory budget (peak interpolated linearly between the measured frame counts; "
          f"'>= {rows[-1]['frames']}' = fits the longest run, nothing measured beyond)")
    print("| budget GB/rank | naive: most frames | MR-SP: most frames | MR-SP / naive |")
    print("|---|---|---|---|")
    for B in [lo + (hi - lo) * k / 5 for k in range(1, 6)]:
        fn, fm = (frames_under([(r["frames"], r[m]["peak_gb"]) for r in rows], B) for m in ("naive", "mrsp"))
        top = rows[-1]["frames"]
        show = lambda f: "none" if f is None else (f">= {f}" if f == top else f"{f:.0f}")
        if fn is None or fm is None or fn == top:
            ratio = "-"
        else:   # MR-SP at the longest run: it fits at least that much
            ratio = (">= " if fm == top else "") + f"{fm / fn:.2f}x"
        print(f"| {B:.2f} | {show(fn)} | {show(fm)} | {ratio} |")
        out_rows.append(dict(budget_gb=B, naive_frames=fn, mrsp_frames=fm))
    return out_rows


def frames_under(points, budget):
    """Most frames whose peak stays within budget, from measured (frames, peak) points in increasing frames: the
    first crossing of the piecewise-linear peak curve. None if even the first point is over, the last frame count
    if no point is."""
    if points[0][1] > budget:
        return None
    for (f0, p0), (f1, p1) in zip(points, points[1:]):
        if p1 > budget:
            return f0 + (f1 - f0) * (budget - p0) / (p1 - p0)
    return points[-1][0]


def print_calibration(cal):
    print("\n[2] vision/LLM cost share: one video encode vs one LLM forward over the sequence "
          "(thread CPU time, min of 5)")
    print("| frames | seq tokens | encode ms | LLM fwd ms | LLM fwd+bwd ms | bench r (time) | bench r (FLOPs) "
          "| 7B r (FLOPs, 336x336) |")
    print("|---|---|---|---|---|---|---|---|")
    for c in cal:
        print(f"| {c['frames']} | {c['seq_tokens']} | {c['t_encode'] * 1e3:.1f} | {c['t_llm_fwd'] * 1e3:.1f} | "
              f"{c['t_llm_fwd_bwd'] * 1e3:.1f} | **{c['r_time']:.2f}** | {c['r_flops']:.2f} | "
              f"**{c['r_flops_7b']:.2f}** |")


def cost_model(r, b, G):
    """Per prompt, in LLM forwards over the sequence, decode and fixed costs left out: MR-SP = r (1 encode) + 1 (one
    rollout prefill shared by G) + 2G (old, ref) + bG (train fwd+bwd); naive (rl.py --loop=naive) = G*r + G (G rollout
    requests, each encoded and prefilled) + 2G*(1+r) + G*(b+r). -> (naive/MR-SP ceiling, r needed for 2.1x)."""
    mr = r + 1 + 2 * G + b * G
    nv = 4 * G * r + 3 * G + b * G
    need = (2.1 * (1 + 2 * G + b * G) - 3 * G - b * G) / (4 * G - 2.1)
    return nv / mr, need


def print_estimate(frame_list):
    print(f"\n[3] ESTIMATED per-GPU peak of Qwen2.5-VL-7B RL on 8 GPUs (estimate.estimate_memory, 336x336, G=5, "
          f"1,024-token responses), budget {gpu_mem_gib:g} GiB - 10% reserve")
    print("| frames | video tokens | naive (SP=1) GiB/GPU | MR-SP (SP=8) GiB/GPU |")
    print("|---|---|---|---|")
    rows = []
    for F in frame_list:
        a = estimate.estimate_memory("qwen2.5-vl-7b", F, gpus=8, sp=1, gpu_mem_gib=gpu_mem_gib)
        b = estimate.estimate_memory("qwen2.5-vl-7b", F, gpus=8, sp=8, gpu_mem_gib=gpu_mem_gib)
        mark = lambda e: f"{e['peak'] / estimate.GiB:.1f}" + ("" if e["fits"] else " **OOM at budget**")
        print(f"| {F} | {a['video_tokens']:,} | {mark(a)} | {mark(b)} |")
        rows.append(dict(frames=F, video_tokens=a["video_tokens"], naive_gib=a["peak"] / estimate.GiB,
                         mrsp_gib=b["peak"] / estimate.GiB, naive_fits=a["fits"], mrsp_fits=b["fits"],
                         budget_gib=a["budget"] / estimate.GiB))
    return rows


# -----------------------------------------------------------------------------
def main():
    common.apply_overrides(globals(), sys.argv[1:])
    cfg = common.config_of(globals())
    frame_list = [int(x) for x in str(frames).split(",") if x.strip()]
    if vision not in ("7b", "tiny"):
        raise SystemExit(f"--vision={vision}: expected 7b or tiny")
    if max(frame_list) > video_frames:
        raise SystemExit(f"--frames={frames}: at most --video_frames={video_frames}")
    if nproc < 1 or prompts_per_step % nproc:
        raise SystemExit(f"--nproc={nproc}: must be >= 1 and divide --prompts_per_step={prompts_per_step} (the naive "
                         "loop splits the prompts data-parallel)")
    if steps <= warmup:
        raise SystemExit(f"--steps={steps} must exceed --warmup={warmup}")
    t_start, load0 = time.time(), os.getloadavg()[0]
    print(f"bench_mrsp: torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ['OMP_NUM_THREADS']}, load avg {load0:.2f}; config {json.dumps(cfg)}", flush=True)

    # --- data + model (new videos every step: steps * prompts_per_step distinct videos)
    data_dir = os.path.join(out, "data")
    make_data(data_dir, steps * prompts_per_step)
    train_file, repeat_file = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "repeat.jsonl")
    model_dir = os.path.join(out, f"model_{vision}")
    make_model(model_dir, train_file)
    n_vis = n_llm = 0
    with torch.device("meta"):
        from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
        m = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(model_dir))
        n_vis = sum(p.numel() for p in m.model.visual.parameters())
        n_llm = sum(p.numel() for p in m.model.language_model.parameters())
    print(f"model {model_dir}: vision {n_vis / 1e6:.3f}M params, LLM {n_llm / 1e6:.3f}M; data {data_dir}: "
          f"{steps * prompts_per_step} videos x {video_frames} frames at {SIZE}x{SIZE}", flush=True)

    cal = calibration(model_dir, train_file, frame_list) if calibrate else []

    # --- the runs, interleaved per frame count (order alternates)
    res = []
    for i, F in enumerate(frame_list):
        modes = ["naive", "mrsp"] + (["cached"] if cached else [])
        runs = {}
        for mode in (modes if i % 2 == 0 else modes[::-1]):
            runs[mode] = run_rl(mode, model_dir, repeat_file if mode == "cached" else train_file, F, mode)
        r = dict(frames=F, video_tokens=estimate.video_tokens(F, SIZE, SIZE), same_tokens=same_tokens(runs["naive"],
                 runs["mrsp"]), **{k: summarize(v) for k, v in runs.items()}, runs=runs)
        n, m = r["naive"], r["mrsp"]
        if n and m:
            print(f"  {F} frames, s/step wall / CPU: naive {n['step_s']:.2f} / {n['cpu_s']:.2f}, MR-SP "
                  f"{m['step_s']:.2f} / {m['cpu_s']:.2f} ({n['step_s'] / m['step_s']:.2f}x / "
                  f"{n['cpu_s'] / m['cpu_s']:.2f}x)" + (f", cached {r['cached']['step_s']:.2f} / "
                                                        f"{r['cached']['cpu_s']:.2f}" if r.get("cached") else ""),
                  flush=True)
        res.append(r)

    # --- report
    print_table(res)
    mem = print_memory(res)
    if mem_budget_gb:
        for mode in ("naive", "mrsp", "cached"):
            ok = [r["frames"] for r in res if r.get(mode) and not r[mode]["over_budget"]]
            print(f"  measured peak <= {mem_budget_gb:g} GB budget, {mode}: frames {ok or 'none'}")
    if cal:
        print_calibration(cal)
    est = print_estimate(sorted(set(frame_list) | set(EST_EXTRA_FRAMES)))
    print("\n[4] cost model (per prompt, in LLM forwards; decode and fixed costs left out), G="
          f"{group_size}: ceiling naive/MR-SP speed-up for a vision/LLM share r, and the r 2.1x would need")
    cases = [(f"7B, {F} frames (FLOPs)", ratio_7b(F), 3.0) for F in sorted({512, frame_list[-1]})]
    if cal:   # the bench model at the longest frame count, with its measured fwd+bwd / fwd time
        c = cal[-1]
        cases.append((f"bench, {c['frames']} frames (measured)", c["r_time"], c["t_llm_fwd_bwd"] / c["t_llm_fwd"]))
    for name, r, b in cases:
        up, need = cost_model(r, b, group_size)
        print(f"  {name}: r {r:.2f}, fwd+bwd/fwd {b:.1f} -> ceiling {up:.2f}x; 2.1x needs r >= {need:.2f}")
    print("  paper (Qwen2.5-VL-7B, 512 frames, 8 GPUs): 439 s -> 205 s a step, 2.1x; naive OOM at 1,024 frames")
    dt = time.time() - t_start
    print(f"\ntotal {dt:.0f} s; load avg {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (wall-clock "
          "step times on a shared machine are noisy; vision passes, token equality and FLOP ratios are exact)")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(config=cfg, bench_text=BENCH_TEXT, bench_vision=BENCH_VISION, params_vision=n_vis,
                       params_llm=n_llm, calibration=cal, rows=res, memory=mem, estimate=est, total_s=dt,
                       load_avg=[load0, os.getloadavg()[0]], torch=torch.__version__, cpus=os.cpu_count()),
                  f, indent=1, default=str)
    print(f"rows written to {os.path.join(out, 'results.json')}")


if __name__ == "__main__":
    main()
