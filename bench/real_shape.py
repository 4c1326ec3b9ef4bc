"""Real shapes, not only the tiny model: Qwen2.5-VL-7B's true widths with few decoder layers, smoke-run end to end.

    torchrun --standalone --nproc_per_node=2 bench/real_shape.py --frames=32      # the smoke run (2-core CPU: ~40 min)
    torchrun --standalone --nproc_per_node=2 bench/real_shape.py --frames=4 --layers=1   # a quick one (~5-10 min)
    python bench/real_shape.py --build_only=1 --out=out/real_shape               # only write the checkpoint

Every test runs the embedded tiny Qwen2.5-VL (width 128, head_dim 32, 2 vision blocks, 56x56 frames). Bugs that
only show at real shapes pass there: head_dim 128, GQA 7:1 (28 query / 4 KV heads), mrope sections [16, 24, 24], the
32-block vision tower with window attention (112 px windows, full attention in blocks 7/15/23/31), and real pixel
budgets (a 640x360 frame -> 364x644 -> 299 tokens per 2 frames, not 4). This script builds a random-init
Qwen2_5_VLForConditionalGeneration with:
  * the full vision tower of the 7B: depth 32, width 1280, MLP 3420, 16 heads, window 112, full-attention blocks
    [7, 15, 23, 31], patch 14, spatial merge 2, temporal patch 2, output 3584 (~0.67B params);
  * the 7B's decoder layer: width 3584, 28 query / 4 KV heads, head_dim 128, MLP 18944, rope_theta 1e6, mrope
    sections [16, 24, 24] -- but only --layers of them (default 2, ~0.23B params each) and a small vocabulary (a
    byte-level BPE trained locally, as the tiny checkpoint's);
  * the real Qwen2.5-VL-7B processor settings: min_pixels 3136, max_pixels 12845056, patch 14, merge 2, temporal 2,
    OpenAI CLIP mean/std (video frames are sized by data.py's qwen-vl-utils rules, which this script only calls);
saved as a normal HF checkpoint directory (bf16 weights, like the released one), then runs on a realistic video
(bench/make_videos.py: 5 minutes of 640x360 H.264, keyframe every 250 frames) under torchrun, SP = world size:
  1. parallel decode + encode (each SP rank decodes and encodes its share of the frames) == one-rank encode;
  2. sequence-parallel log-probs (ring attention) == one rank's;
  3. one HF rollout of G answers (a few tokens) from the cached embeddings;
  4. one RL step: rl.prefill (old-policy log-probs, SP, FSDP2) vs the rollout's own log-probs, then rl.update
     (rl.grpo_loss over the G rollouts, backward, AdamW) on the FSDP2-sharded LLM;
  5. one SFT step: sp_logprobs + backward + AdamW on FSDP2;
and prints a table of each check (result, time, peak RSS over ranks), exiting non-zero if one failed.

Memory plan (2 processes in 24 GB; fp32 everywhere -- this CPU has no bf16 matmul units, bf16 runs ~40x slower):
each rank loads the model (vision 2.7 GB + 2 layers 1.9 GB), runs checks 1-3 unsharded, then drops the vision tower
(the video's embeddings are cached; the frozen tower is not needed again) and shards the LLM with FSDP2 for the
steps: ~1 GB of weights + 1 GB of gradients + 2 GB of AdamW state per rank, plus FSDP's gathered layer (0.9 GB fp32)
and activations (checkpointed layers). Measured at 32 frames (docs/BENCHMARKS.md): peak RSS 7.7 GB a rank at load,
10.4 GB in the SFT step -- ~21 GB for the two; --layers=1 on a smaller machine.
The one-rank references run on rank 0 with all the world's threads while the other ranks wait.
"""
import contextlib
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "bench")) if p not in sys.path]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402
import mrsp  # noqa: E402
import prepare  # noqa: E402
import rl  # noqa: E402

# Qwen2.5-VL-7B-Instruct's released config.json, minus the number of decoder layers and the vocabulary
REAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, hidden_act="silu",
                   out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
REAL_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                 head_dim=128, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
                 use_sliding_window=False,
                 rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]))
REAL_PIXELS = dict(min_pixels=3136, max_pixels=12845056)   # its preprocessor_config.json (images and videos)
# the smoke run's question about the test video (the random-init model answers nothing; the text sets the lengths)
QUESTION = "What does the camera do over the whole video?"
OPTIONS = ["A. It stays still.", "B. It pans across changing scenes.", "C. It zooms in once.", "D. It goes dark."]
REASONING = "The shots change every few seconds and the view keeps moving across textured scenes."


# -----------------------------------------------------------------------------
# the checkpoint
def make_tokenizer(src=""):
    """The tiny checkpoint's kind of tokenizer: a checkpoint dir's (src), or a byte-level BPE trained with
    prepare.train_tokenizer on the synthetic QA texts (records drawn in memory: no video is written)."""
    if src:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(src)
    import numpy as np
    rng = np.random.default_rng(0)
    texts = [data.INSTRUCTION, "You are a helpful assistant.", "system", "user", "assistant", QUESTION,
             "\n".join(OPTIONS), REASONING]
    for i in range(32):   # every category and letter: the tokenizer sees the words the prompts use
        _, rec = prepare.make_synthetic_sample(rng, data.CATEGORIES[i % 4], answer_idx=i // 4 % 4, T=64, S=56)
        texts += [rec["question"], "\n".join(rec["options"]), data.format_target(rec)]
    return prepare.train_tokenizer(texts)


def real_config(tokenizer, layers=2, text=None, vision=None):
    """Qwen2_5_VLConfig at the 7B's widths with `layers` decoder layers and the tokenizer's (padded) vocabulary.
    text / vision: overrides of REAL_TEXT / REAL_VISION (bench/gpu_check.py's small CPU variant)."""
    from transformers import Qwen2_5_VLConfig
    if not (isinstance(layers, int) and layers >= 1):
        raise ValueError(f"--layers={layers}: expected a positive number of decoder layers")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in prepare.SPECIAL_TOKENS}
    tx = dict(REAL_TEXT, **(text or {}))
    return Qwen2_5_VLConfig(
        text_config=dict(tx, num_hidden_layers=layers, layer_types=["full_attention"] * layers,
                         vocab_size=(len(tokenizer) + 63) // 64 * 64, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(REAL_VISION, **(vision or {})), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def real_processor(tokenizer):
    """Qwen2_5_VLProcessor with Qwen2.5-VL-7B's image/video settings (pixel range, patch, merge, CLIP mean/std).
    cap_pixels_per_frame=True: qwen-vl-utils' per-frame share of a total budget (transformers' coming default)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    settings = dict(REAL_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2, image_mean=OPENAI_CLIP_MEAN,
                    image_std=OPENAI_CLIP_STD)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**settings),
                               video_processor=Qwen2VLVideoProcessor(**settings, cap_pixels_per_frame=True),
                               tokenizer=tokenizer, chat_template=prepare.CHAT_TEMPLATE)


def build_checkpoint(out_dir, layers=2, seed=0, tokenizer_src=""):
    """Write the random-init real-shaped model (bf16 weights) + processor to out_dir, unless a checkpoint of the same
    spec is there. -> out_dir."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
    spec = dict(layers=layers, seed=seed, tokenizer=tokenizer_src, text=REAL_TEXT, vision=REAL_VISION,
                pixels=REAL_PIXELS)
    marker = os.path.join(out_dir, "real_shape.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                return out_dir
    tok = make_tokenizer(tokenizer_src)
    config = real_config(tok, layers)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)   # the 7B ships bf16
    ids = config.text_config
    model.generation_config = GenerationConfig(eos_token_id=ids.eos_token_id, pad_token_id=ids.pad_token_id,
                                               bos_token_id=ids.bos_token_id)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    real_processor(tok).save_pretrained(out_dir)
    with open(marker, "w") as f:
        json.dump(spec, f)
    return out_dir


# -----------------------------------------------------------------------------
# the smoke run's bookkeeping: one row per check, with time and memory over all ranks
def rss_gb():
    """(anonymous RSS now, peak RSS) of this process in GB. The peak (ru_maxrss) also counts file pages mapped while
    the checkpoint loads (safetensors are mmapped; shared by the ranks, reclaimable); the anonymous RSS is the memory
    the process itself holds."""
    with open("/proc/self/status") as f:
        anon = next(int(ln.split()[1]) for ln in f if ln.startswith("RssAnon:"))   # kB
    return anon / 1e6, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # ru_maxrss: KiB on Linux


class Table:
    """Rows of (check, PASS/FAIL, detail, seconds, peak RSS GB max over ranks). `with table.row(name) as r:` times the
    block; the block sets r["ok"] and r["detail"]. The pass flag and RSS are reduced over ranks (a collective: every
    rank runs every row); a failed row stops the run after the table. An exception on any rank prints the table so far
    and leaves at once (os._exit(1)): its peers may be inside a collective it will never join, and torchrun stops
    them when one worker dies, instead of a hang until the process-group timeout."""

    def __init__(self, rank, world):
        self.rank, self.world, self.rows = rank, world, []

    @contextlib.contextmanager
    def row(self, name):
        r = dict(check=name, ok=False, detail="", error=None)
        t0 = time.time()
        try:
            yield r
        except Exception as e:  # noqa: BLE001 - reported, then this process leaves (see the class docstring)
            import traceback
            traceback.print_exc()
            r.update(s=time.time() - t0, ok=False, error=f"rank {self.rank}: {type(e).__name__}: {e}",
                     rss_now=rss_gb()[0], rss_peak=rss_gb()[1])
            self.rows.append(r)
            self.world, self.rank = 1, 0   # print this rank's view of the table, no collective
            self.finish()
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(1)
        r["s"] = time.time() - t0
        x = torch.tensor([0.0 if r["ok"] else 1.0, *rss_gb()], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
        r["ok"], r["rss_now"], r["rss_peak"] = x[0].item() == 0, x[1].item(), x[2].item()
        self.rows.append(r)
        if self.rank == 0:
            print(f"[{name}] {'PASS' if r['ok'] else 'FAIL'} {r['s']:.1f}s peak RSS {r['rss_peak']:.2f} GB: "
                  f"{r['error'] or r['detail']}", flush=True)
        if not r["ok"]:
            raise SystemExit(self.finish())

    def finish(self):
        """Print the table; -> exit code (0: every row passed)."""
        if self.rank == 0:
            print(f"\n| check | result | detail | time s | anon RSS after, GB | peak RSS, GB (max over {self.world} "
                  "ranks) |")
            print("|---|---|---|---|---|---|")
            for r in self.rows:
                print(f"| {r['check']} | {'PASS' if r['ok'] else 'FAIL'} | {r['error'] or r['detail']} | "
                      f"{r['s']:.1f} | {r['rss_now']:.2f} | {r['rss_peak']:.2f} |")
            print(f"\n{'ALL PASSED' if all(r['ok'] for r in self.rows) else 'FAILED'}", flush=True)
        return 0 if all(r["ok"] for r in self.rows) else 1


@contextlib.contextmanager
def threads(n):
    """torch intra-op threads inside the block (rank 0 runs the one-rank references with the idle ranks' cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def on_rank0(fn, rank):
    """fn() on rank 0 only, the other ranks waiting (a barrier), the result broadcast to all."""
    box = [fn() if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def set_rl_flags(**flags):
    """rl.py's config globals that rl.prefill / rl.update read, set as its --key=value flags would."""
    for k, v in flags.items():
        assert hasattr(rl, k), f"rl.py has no config global {k!r} any more"
        setattr(rl, k, v)


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# -----------------------------------------------------------------------------
# config (override with --key=value)
out = os.path.join(ROOT, "out", "real_shape")   # checkpoint dir (model-<layers>l/) and the default video
layers = 2                 # decoder layers at the 7B's width (the 7B has 28)
frames = 32                # frames sampled from the video (uniformly, a multiple of 2)
video = ""                 # a video file; "" = {out}/video_<video_seconds>s_<video_height>p.mp4 (bench/make_videos.py)
video_seconds = 300.0
video_height = 360
video_width = 640
group_size = 2             # G rollouts for the RL step
new_tokens = 4             # tokens per rollout
lr = 1e-6                  # AdamW (RL and SFT steps)
activation_checkpointing = True   # per decoder layer, as the 7B recipe (--activation_checkpointing=1)
tokenizer = ""             # a checkpoint dir whose tokenizer to reuse (e.g. out/tiny); "" = train one
enc_tol = 1e-4             # parallel vs one-rank encode, max abs diff relative to max |embedding| (fp32)
lp_tol = 1e-4              # SP vs one-rank log-probs, max abs diff (fp32, nats)
gap_tol = 1e-3             # rollout's own log-probs vs the trainer's SP prefill (fp32, nats)
build_only = False         # write the checkpoint (and video) and exit
timeout_min = 120          # process-group timeout: rank 0's one-rank references keep the others waiting
seed = 0


def main():
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # per-rank weight-loading bars would bury the table
    rank, _, world, device = common.setup_dist(timeout_min)   # long: rank 0's one-rank references keep others waiting
    ckpt = os.path.join(out, f"model-{layers}l")
    vid = video or os.path.join(out, f"video_{video_seconds:g}s_{video_height}p.mp4")
    t0 = time.time()
    if rank == 0:
        build_checkpoint(ckpt, layers, seed, tokenizer)
        if not os.path.isfile(vid):
            import make_videos
            info = make_videos.make_video(vid, video_seconds, video_height, video_width, seed=seed)
            print(f"video: {vid}, {info['bytes'] / 1e6:.1f} MB ({info['kbps']:.0f} kb/s), "
                  f"made in {info['gen_s']:.0f} s")
        print(f"checkpoint {ckpt} and video {vid} ready in {time.time() - t0:.0f} s", flush=True)
    if world > 1:
        dist.barrier()
    if build_only:
        return 0
    mesh = mrsp.setup_mesh(sp=world)
    table = Table(rank, world)
    sp = mesh.sp_group
    # the one-rank references run inside the world of `world` processes: ring attention needs a group of its own
    solo = dist.new_group([0]) if world > 1 else None   # (a collective: every rank creates it)
    rec = dict(id="real-shape-0", video=vid, question=QUESTION, options=OPTIONS, answer="B", reasoning=REASONING,
               category="temporal")

    with table.row("load model (fp32)") as r:
        # loaded as stored (bf16), then widened tensor by tensor: a direct fp32 load holds both copies at its peak
        model, processor = mrsp.load_model(ckpt, "bfloat16", device)
        model.float().eval()
        n_vis = sum(p.numel() for p in model.model.visual.parameters())
        n_llm = sum(p.numel() for p in model.parameters()) - n_vis
        tc = model.config.text_config
        r["detail"] = (f"vision {n_vis / 1e9:.2f}B params, LLM {n_llm / 1e9:.2f}B ({tc.num_hidden_layers} layers, "
                       f"{tc.num_attention_heads}/{tc.num_key_value_heads} heads x {tc.head_dim})")
        r["ok"] = True

    with table.row(f"parallel decode+encode SP={world} == SP=1") as r:
        t = time.time()
        (v,), _ = mrsp.get_video_embeds(model, processor, [rec], None, num_frames=frames, group=sp, device=device)
        t_sp = time.time() - t
        emb, grid = v["embeds"], v["video_grid_thw"]

        def reference():
            with threads(world):
                t = time.time()
                (ref,), _ = mrsp.get_video_embeds(model, processor, [rec], None, num_frames=frames, device=device)
                return ref["embeds"], time.time() - t
        ref, t_one = on_rank0(reference, rank)
        T, h, w = grid[0].tolist()
        merge = processor.video_processor.merge_size
        d = max_diff(emb, ref) / max(ref.abs().max().item(), 1e-30)
        r["detail"] = (f"{frames} frames -> {h * 14}x{w * 14} px per frame, grid {T}x{h}x{w}, "
                       f"{T * h * w // merge ** 2} video tokens; max rel diff {d:.1e} (tol {enc_tol:g}); "
                       f"SP={world} {t_sp:.0f}s, SP=1 {t_one:.0f}s ({world} threads)")
        r["ok"] = d <= enc_tol

    sft_seq = dict(data.encode_text(processor, rec, grid, with_target=True), embeds=emb, video_grid_thw=grid,
                   second_per_grid_ts=v["second_per_grid_ts"])
    sft_seq["loss_mask"] = sft_seq["labels"] != -100
    with table.row(f"SP={world} log-probs == SP=1 (ring)") as r, torch.no_grad():
        t = time.time()
        lp = mrsp.sp_logprobs(model, sft_seq, group=sp)
        t_sp = time.time() - t

        def reference():
            with threads(world):
                return mrsp.sp_logprobs(model, sft_seq, group=solo)
        lp1 = on_rank0(reference, rank)
        m = sft_seq["loss_mask"]
        d = max_diff(lp[m], lp1[m])
        r["detail"] = (f"{sft_seq['input_ids'].numel()} tokens, {int(m.sum())} scored, mean logp {lp[m].mean():.3f}; "
                       f"max abs diff {d:.1e} (tol {lp_tol:g}); SP={world} {t_sp:.0f}s")
        r["ok"] = d <= lp_tol and bool(torch.isfinite(lp[m]).all())

    prompt = {k: x for k, x in data.encode_text(processor, rec, grid, with_target=False).items()
              if k in ("input_ids", "mm_token_type_ids")}
    prompt.update(video_grid_thw=grid, second_per_grid_ts=v["second_per_grid_ts"])
    tok = processor.tokenizer
    with table.row(f"HF rollout, G={group_size} x {new_tokens} tokens") as r:
        def rollout():
            with threads(world):
                gen = torch.Generator().manual_seed(seed)
                return mrsp.hf_rollout(model, [dict(prompt, embeds=emb)], n=group_size, temperature=1.0,
                                       max_new_tokens=new_tokens, eos_id=tok.convert_tokens_to_ids("<|im_end|>"),
                                       pad_id=tok.pad_token_id, generator=gen)
        o = on_rank0(rollout, rank)
        resp = [rl.finish_response(t, f, lp, rec, tok, model.config.video_token_id)
                for t, f, lp in zip(o["token_ids"], o["finish_reasons"], o["logprobs"])]
        r["detail"] = f"{prompt['input_ids'].numel()}-token prompt; " + "; ".join(
            f"{len(x['tokens'])} tokens, logp {sum(x['logprobs']):.2f}" for x in resp)
        r["ok"] = all(x["tokens"] and bool(torch.isfinite(torch.tensor(x["logprobs"])).all()) for x in resp)

    # the steps: the video's embeddings are cached, so the frozen vision tower's weights go (2.7 GB a rank; emptied
    # in place, not moved to "meta": mrsp takes the device from the model's first parameter, a vision one) and the
    # LLM is sharded over all ranks (FSDP2), as rl.py / sft.py do
    for p in model.model.visual.parameters():
        p.data = p.data.new_empty(0)
    mrsp.prepare_model(model, mesh, freeze_vision=True, activation_checkpointing=activation_checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    probe = model.model.language_model.layers[0].self_attn.q_proj.weight   # a sharded parameter: does it move?
    local = lambda p: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()   # noqa: E731

    with table.row(f"RL step: SP prefill + GRPO loss over G={group_size} (FSDP2)") as r:
        set_rl_flags(attn="ring", temperature=1.0, keep_gathered=False, agg="token-mean", kl_coef=1e-2)
        items = [rl.make_item(prompt, x["tokens"], 0, x["logprobs"]) for x in resp]
        videos = [dict(embeds=emb)]
        # a random-init model answers nothing: stand-in rewards with a spread, so the advantages are not all zero
        adv = rl.group_advantages([float(i % 2 == 0) for i in range(group_size)], group_size)
        t = time.time()
        old = rl.prefill(model, items, videos, mesh, from_cache=True)
        t_pre = time.time() - t
        gap = max(max_diff(o_, it["engine_logp"]) for o_, it in zip(old, items))
        before = local(probe)
        # reference = the initial policy, which at the first step is pi_old: its prefill would repeat `old`
        acc = rl.update(model, opt, params, items, videos, adv, old, old, mesh, from_cache=True, first_epoch=True)
        moved = max_diff(local(probe), before)
        r["detail"] = (f"rollout vs SP prefill log-probs max diff {gap:.1e} (tol {gap_tol:g}); loss {acc['loss']:.4f}, "
                       f"grad norm {acc['grad_norm']:.3g}, weights moved {moved:.1e}; prefill {t_pre:.0f}s, "
                       f"update {time.time() - t - t_pre:.0f}s")
        r["ok"] = (gap <= gap_tol and torch.isfinite(torch.tensor(acc["loss"])).item()
                   and 0 < acc["grad_norm"] < float("inf") and moved > 0)

    with table.row("SFT step: SP log-probs + backward + AdamW (FSDP2)") as r:
        before = local(probe)
        n_tok = int(sft_seq["loss_mask"].sum())
        loss = -mrsp.sp_logprobs(model, sft_seq, group=sp).sum() / n_tok
        loss.backward()
        gn = common.clip_grad(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        moved = max_diff(local(probe), before)
        r["detail"] = (f"loss {loss.item():.4f} (before the RL step, SP=1: {-lp1[sft_seq['loss_mask']].mean():.4f}), "
                       f"grad norm {gn:.3g}, weights moved {moved:.1e}")
        r["ok"] = bool(torch.isfinite(loss)) and 0 < gn < float("inf") and moved > 0
    code = table.finish()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    common.apply_overrides(globals(), sys.argv[1:])
    if int(os.environ.get("RANK", 0)) == 0:
        print("config:", json.dumps(common.config_of(globals())), flush=True)
    sys.exit(main())
