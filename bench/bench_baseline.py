"""The paper's baseline vs MR-SP's stages on realistic videos: rl.py --loop=baseline (EasyR1 / Long-RL semantics)
beside --loop=mrsp (stage 1, and stage 1+2 with SP) and a compute-only control, same prompts, same sampled tokens.

    python bench/bench_baseline.py                                   # 1 process, 8..512 frames
    python bench/bench_baseline.py --nproc=2 --frames=64,512         # 2 processes: DP=2 arms and stage1+2 at SP=2

Arms (one rl.py process, or torchrun --nproc_per_node=nproc, each; same seed, data and flags otherwise):
  baseline      --loop=baseline: per prompt per step, as EasyR1 (which Long-RL's release is built on) does it --
                  dataset: fetch_video to build the prompt (decode 1)
                  rollout worker: fetch_video (decode 2) -> vLLM's processor on the frames (processor run 1) ->
                    vision tower once, ONE prefill shared by the G samples (vLLM n=G, prefix caching)
                  actor input preparation: each of the G repeated rows decodes + pre-processes its video (G decodes,
                    G processor runs), kept for the step
                  old-policy, reference and update forwards: the vision tower runs inside the (FSDP) model for every
                    sequence (3G passes), parameters gathered per pass (--keep_gathered=0, every arm)
                -> G+2 decodes, G+1 processor runs, 3G+1 vision passes, 1 rollout prefill per prompt (kl_coef > 0)
  compute-only  --loop=baseline --decode_once=1: the same vision passes, one decode + processor run per prompt
  stage1        --loop=mrsp --sp=1: decode + encode once per video, the embedding cache serves the rollouts, the
                prefills and the update (same data-parallel layout as the baseline)
  stage1+2      --loop=mrsp --sp=nproc (nproc > 1): plus the sequence-parallel decode/encode, prefill and update
  stage1-ckpt, stage1+2-ckpt   the same with --activation_checkpointing=1: what a run does when its peak does not fit
                (not in the default arms; --mem_budget_gb=X then reports, per frame count, the fastest variant of each
                stage whose measured peak fits X GB per rank -- where memory binds, stage 1 must pay for recompute or
                stop, and stage 1+2 can overtake it)

Videos: ONE realistic H.264 file (bench/make_videos.py: --video_seconds long, --video_height 360 or 720 at 16:9, 30
fps, keyframe every 250, film grain, cuts), hard-linked under a distinct name for every record, so every step draws
"new" videos for the embedding cache while every decode does the same real work (the file sits in the page cache for
all arms alike). By default the model sees each frame at 56x56 (records: resized_height/width=frame_size): the bench
model of bench_mrsp.py, sized to Qwen2.5-VL-7B's vision/LLM cost share at that input. A larger --frame_size (112,
168) gives the model more work per frame, the decodes stay the same, so the decode share falls: the knob that moves
a run along the speed-up vs decode-share curve. --max_new_tokens (default 32) sets the generation budget: a long-CoT
one (1,024, as rl.py's real-run command) adds the per-step cost outside the video that every arm pays alike (rollout
decoding, and old / ref / update over longer sequences), which lowers every ratio, most at few frames. Decoding is
at the file's size with the same reader for every arm (--decode_backend; "" = data.load_video's default; pyav-seq =
no seeking: a cost flat in the frames sampled, the profile of qwen-vl-utils' torchvision reader at ~0.4-0.6x its
cost). Wall-clock figures depend on this machine's decode speed relative to its model compute: the transferable
figure is the decode share (decode s / stage-1 step s) printed next to each speed-up.
"""
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import bench_mrsp  # noqa: E402
import common  # noqa: E402

out = os.path.join(ROOT, "out", "bench_baseline")
frames = "8,16,64,128,256,512"
steps = 3
warmup = 1
prompts_per_step = 2
group_size = 5
max_new_tokens = 32          # rollout budget: 1024 (long CoT, as rl.py's real run) adds a per-step cost beyond video
kl_coef = 1e-2
nproc = 1
arms = "baseline,compute-only,stage1,stage1+2"
video_seconds = 60.0
video_height = 360           # 360 -> 640x360, 720 -> 1280x720 (16:9)
decode_backend = ""          # every arm's decoder (rl.py --decode_backend): "" = PyAV, then decord; pyav | decord |
                             # pyav-seq (every frame from the start: a read_video-style cost, flat in the frames)
frame_size = 56              # the model sees every frame at frame_size x frame_size (records' resized_height/width):
                             # larger = more model work per frame, a lower decode share (same decodes)
mem_budget_gb = 0.0          # per-rank peak budget (GB): arms above it are "over budget"; 0 = off
run_timeout = 1800
seed = 0

QUESTION = dict(question="What happens in the video?", options=["A. a cut", "B. a pan", "C. a zoom", "D. nothing"],
                answer="B", reasoning="The camera pans.")


def make_data(root, video, n):
    """n records, each naming its own hard link of `video` (distinct cache keys, the same decode work)."""
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    rows = []
    for i in range(n):
        link = os.path.join(root, "videos", f"v{i:03d}.mp4")
        if not os.path.exists(link):
            os.link(video, link)
        rows.append(dict(id=f"q{i}", video=f"videos/v{i:03d}.mp4", category="temporal",
                         resized_height=frame_size, resized_width=frame_size, **QUESTION))
    path = os.path.join(root, "train.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def allow_frame_size(model_dir):
    """Raise the bench model's video-processor pixel cap (the tiny model's is 56x56 = 3,136 pixels) to frame_size^2:
    the processor re-sizes frames above its cap as the reference pipeline does, so without this a --frame_size of
    112 would silently reach the model at 56x56 (the real 7B's cap is 12.8M pixels)."""
    path = os.path.join(model_dir, "processor_config.json")
    with open(path) as f:
        cfg = json.load(f)
    size = cfg["video_processor"]["size"]
    if size["longest_edge"] < frame_size ** 2:
        size["longest_edge"] = frame_size ** 2
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)


ARM_FLAGS = {"baseline": ["--loop=baseline", "--sp=1"],
             "compute-only": ["--loop=baseline", "--decode_once=1", "--sp=1"],
             "stage1": ["--loop=mrsp", "--sp=1"], "stage1+2": None,   # stage1+2: --sp=nproc
             "stage1-ckpt": ["--loop=mrsp", "--sp=1", "--activation_checkpointing=1"], "stage1+2-ckpt": None}


def arm_flags(arm):
    """rl.py's flags for an arm: ARM_FLAGS, or for stage1+2 (-ckpt) the SP group over every process."""
    return ARM_FLAGS[arm] or ["--loop=mrsp", f"--sp={nproc}"] + ["--activation_checkpointing=1"] * arm.endswith("-ckpt")


def run_arm(arm, model_dir, data_file, F):
    run_dir = os.path.join(out, "runs", f"{arm}_f{F}_p{nproc}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    flags = arm_flags(arm)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    cmd = launch + [os.path.join(ROOT, "rl.py"), f"--model={model_dir}", f"--data={data_file}", "--val_data=",
                    f"--out_dir={run_dir}", f"--frames={F}", f"--steps={steps}",
                    f"--prompts_per_step={prompts_per_step}",
                    f"--group_size={group_size}", f"--max_new_tokens={max_new_tokens}", f"--kl_coef={kl_coef}",
                    f"--seed={seed}", f"--save_every={steps + 1000}", f"--log_every={steps + 1000}",
                    "--keep_gathered=0", f"--decode_backend={decode_backend}"] + flags
    path = os.path.join(run_dir, "metrics.jsonl")
    t0, cpu_at_row, rc = time.time(), [], None
    with open(os.path.join(run_dir, "log.txt"), "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        while rc is None:
            cpu = bench_mrsp.cpu_seconds(proc.pid)
            if os.path.isfile(path):
                with open(path) as m:
                    n = sum(1 for line in m if line.endswith("\n"))
                cpu_at_row += [cpu] * (n - len(cpu_at_row))
            if time.time() - t0 > run_timeout:
                proc.kill(); proc.wait(); rc = "timeout"
                break
            time.sleep(0.02)
            rc = proc.poll()
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if rc != 0:
        with open(os.path.join(run_dir, "log.txt")) as f:
            print(f"  {arm} {F}: rl.py failed (rc {rc}):\n{f.read()[-3000:]}", flush=True)
    return dict(rows=rows, cpu_at_row=cpu_at_row, rc=rc, cmd=" ".join(cmd[1:]))


KEYS = ("step_time", "decode_s_step", "decode_cpu_s_step", "process_s_step", "process_cpu_s_step", "t_encode",
        "t_vision_collect", "t_rollout", "t_rollout_prefill", "t_rollout_decode", "t_actor_prep", "t_old", "t_ref",
        "t_train", "decodes_step",
        "processor_runs_step", "vision_passes", "rollout_prefills")


def summarize(run):
    rows, cpu = run["rows"], run["cpu_at_row"]
    if len(rows) < steps or len(cpu) < len(rows):
        return None
    timed = rows[warmup:]
    s = {k: sum(r.get(k, 0.0) for r in timed) / len(timed) for k in KEYS}
    cs = [cpu[k] - cpu[k - 1] for k in range(warmup, len(rows)) if None not in (cpu[k], cpu[k - 1])]
    s["cpu_s"] = sum(cs) / max(len(cs), 1)
    s["timed_steps"] = len(timed)
    s["step_times"] = [r["step_time"] for r in timed]   # step k of every arm: the same prompts and tokens (paired)
    s["step_min"], s["step_max"] = min(s["step_times"]), max(s["step_times"])
    s["peak_gb"] = max(r["peak_mem_gb"] for r in rows)
    s["peak_phase"] = max((k for k in rows[-1] if k.startswith("mem_") and k.endswith("_gb")),
                          key=lambda k: max(r.get(k, 0.0) for r in rows))[4:-3]   # the phase that sets the peak
    s["over_budget"] = bool(mem_budget_gb) and s["peak_gb"] > mem_budget_gb
    s["tokens"] = [(r["response_len"], r["reward_mean"]) for r in rows]
    return s


def fit_at_budget(sums, stage):
    """The fastest variant of `stage` (plain or -ckpt) whose measured peak fits the budget: "name s/step", or OOM."""
    fits = [(s["step_time"], a) for a in (stage, stage + "-ckpt") if (s := sums.get(a)) and not s["over_budget"]]
    if not fits:
        peaks = {a: round(sums[a]["peak_gb"], 2) for a in (stage, stage + "-ckpt") if sums.get(a)}
        return f"OOM at budget (peaks {peaks})"
    t, a = min(fits)
    return f"{a} {t:.2f} s/step (peak {sums[a]['peak_gb']:.2f} GB)"


def main():
    common.apply_overrides(globals(), sys.argv[1:])
    cfg = common.config_of(globals())
    Fs = [int(x) for x in str(frames).split(",")]
    names = [a for a in arms.split(",") if not a.startswith("stage1+2") or nproc > 1]
    unknown = [a for a in names if a not in ARM_FLAGS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; expected some of {sorted(ARM_FLAGS)}")
    t_start, load0 = time.time(), os.getloadavg()[0]
    print(f"bench_baseline: {os.cpu_count()} CPUs, load {load0:.2f}; config {json.dumps(cfg)}", flush=True)
    width = 2 * round(video_height * 16 / 9 / 2)
    video = os.path.join(ROOT, "out", "videos", f"real_{video_seconds:g}s_{video_height}p.mp4")
    if not os.path.exists(video):
        from make_videos import make_video
        print(make_video(video, video_seconds, video_height, width), flush=True)
    data_dir = os.path.join(out, "data")
    data_file = make_data(data_dir, video, steps * prompts_per_step)
    model_dir = os.path.join(out, "model_7b")
    bench_mrsp.make_model(model_dir, data_file)
    allow_frame_size(model_dir)
    res = []
    for i, F in enumerate(Fs):
        order = names[i % len(names):] + names[:i % len(names)]   # rotate: drifting load hits every arm
        runs = {a: run_arm(a, model_dir, data_file, F) for a in order}
        sums = {a: summarize(r) for a, r in runs.items()}
        ok = [s for s in sums.values() if s]
        same = len(ok) == len(sums) and all(s["tokens"] == ok[0]["tokens"] for s in ok)
        row = dict(frames=F, nproc=nproc, same_tokens=same, arms=sums, cmds={a: r["cmd"] for a, r in runs.items()})
        res.append(row)
        b, s1 = sums.get("baseline"), sums.get("stage1")
        if b and s1:
            line = (f"  {F} frames: baseline {b['step_time']:.2f} / {b['cpu_s']:.2f} s, stage1 "
                    f"{s1['step_time']:.2f} / {s1['cpu_s']:.2f} s -> {b['step_time'] / s1['step_time']:.2f}x wall, "
                    f"{b['cpu_s'] / s1['cpu_s']:.2f}x CPU; decode share {b['decode_s_step'] / s1['step_time']:.2f}")
            for a in ("compute-only", "stage1+2"):
                if sums.get(a):
                    line += f"; {a} {sums[a]['step_time']:.2f} / {sums[a]['cpu_s']:.2f} s"
            print(line + f"; same tokens {same}", flush=True)
        if mem_budget_gb:
            print(f"  {F} frames at {mem_budget_gb:g} GB/rank: " + "; ".join(
                f"{st} {fit_at_budget(sums, st)}" for st in ("stage1", "stage1+2") if st in names), flush=True)
        with open(os.path.join(out, f"results_p{nproc}.json"), "w") as f:
            json.dump(dict(config=cfg, rows=res, load=[load0, os.getloadavg()[0]], video=video), f, indent=1)
    print(f"total {time.time() - t_start:.0f} s, load {load0:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"rows in {out}/results_p{nproc}.json")


if __name__ == "__main__":
    main()
