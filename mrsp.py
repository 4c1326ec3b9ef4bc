"""
mrsp.py -- MR-SP infrastructure (Multi-modal Reinforcement Sequence Parallelism, LongVILA-R1).

Today this file holds the foundation every stage uses: torchrun set-up, the tiny Qwen2.5-VL
checkpoint builder, and model + processor loading from a local HF checkpoint directory (tiny or a
real Qwen2-VL / Qwen2.5-VL). Parallel video encoding, the embedding cache, the sequence-parallel
prefill and the rollout engines land here next (see the issue tracker).

Write the tiny checkpoint (tokenizer trained on the dataset text + Qwen special tokens):
    python mrsp.py --init_tiny=out/tiny --data=data/synth
Run one video forward per sample (a smoke test of the whole input path), single process:
    python mrsp.py --model=out/tiny --data=data/synth/val.jsonl --num_frames=32
Same, data-parallel on N processes (CPU gloo or CUDA nccl):
    torchrun --standalone --nproc_per_node=2 mrsp.py --model=out/tiny --data=data/synth/val.jsonl
A real checkpoint works the same way:
    torchrun --standalone --nproc_per_node=8 mrsp.py --model=/ckpt/Qwen2.5-VL-7B-Instruct --data=... --dtype=bfloat16
"""
import glob
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from data import (CATEGORIES, INSTRUCTION, apply_overrides, config_of, encode_sample, collate_sft,
                  format_target, load_records, load_video)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

# Qwen2.5-VL's chat template (system default, <|vision_start|><|video_pad|><|vision_end|> per video).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# The tiny model (DESIGN.md §3): ~1M params, a video forward in tens of ms on one CPU core.
TINY_TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[4, 6, 6]))
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[1], tokens_per_second=2)
TINY_PIXELS = 56 * 56  # every frame resized to 56x56 -> 4 video tokens per 2 frames


# -----------------------------------------------------------------------------
# distributed set-up from torchrun's environment
def setup_dist():
    """-> (rank, local_rank, world_size, device). World size 1 runs without torchrun or a process group."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world, device


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# tiny checkpoint
def _dataset_texts(data_dir):
    """Every string a prompt or target can contain, to train the tiny tokenizer on."""
    texts = [INSTRUCTION, "You are a helpful assistant.", "system", "user", "assistant"]
    files = sorted(glob.glob(os.path.join(data_dir, "*.jsonl"))) if os.path.isdir(data_dir) else [data_dir]
    if not files:
        raise FileNotFoundError(f"--data={data_dir}: no *.jsonl files to train the tokenizer on")
    for f in files:
        for r in load_records(f):
            texts += [r["question"], "\n".join(r["options"]), format_target(r)]
    return texts


def train_tokenizer(texts, vocab_size=1024):
    """A byte-level BPE in Qwen2's tokenizer class: any text encodes (bytes fall back), specials kept whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          errors="replace", clean_up_tokenization_spaces=False)


def init_tiny(out_dir, data_dir, seed=0, vocab_size=1024):
    """Write a random-init Qwen2_5_VLForConditionalGeneration + processor as a standard HF checkpoint."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor, GenerationConfig)
    tokenizer = train_tokenizer(_dataset_texts(data_dir), vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS),
        video_processor=Qwen2VLVideoProcessor(min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS,
                                              cap_pixels_per_frame=True),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    vocab = (len(tokenizer) + 63) // 64 * 64  # pad the embedding table, as real checkpoints do
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], **TINY_TEXT),
        vision_config=TINY_VISION, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                                               bos_token_id=ids["<|endoftext|>"])
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    return n


# -----------------------------------------------------------------------------
# loading a local checkpoint (tiny or real)
def load_model(path, dtype="float32", device="cpu", attn_implementation="sdpa"):
    """-> (model, processor) from a local HF Qwen2-VL / Qwen2.5-VL checkpoint directory."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model={path}: expected a local HF checkpoint directory with config.json "
                                f"(build the tiny one with: python mrsp.py --init_tiny={path} --data=data/synth)")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"--model={path}: model_type {config.model_type!r} is not supported; "
                         f"expected one of {SUPPORTED_MODEL_TYPES}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"--dtype={dtype!r}: expected float32, bfloat16 or float16")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype,
                                                        attn_implementation=attn_implementation).to(device)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def model_inputs(batch, device):
    """The tensors of a data.py batch that the HF forward takes. mm_token_type_ids must be passed:
    without it Qwen2.5-VL silently falls back to 1-D positions (DESIGN.md §10)."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
            "second_per_grid_ts", "labels")
    return {k: batch[k].to(device) for k in keys if k in batch}


# -----------------------------------------------------------------------------
# config (override with --key=value)
init_tiny_dir = ""         # if set: write the tiny checkpoint here (needs --data) and exit
data = "data/synth"        # dataset folder (for --init_tiny) or a JSONL/JSON file (for the forward check)
model = "out/tiny"         # local HF checkpoint directory
dtype = "float32"          # float32 | bfloat16 | float16
num_frames = 32            # frames sampled uniformly per video
max_samples = 8            # forward check: samples per run (split over ranks)
seed = 0

if __name__ == "__main__":
    # --init_tiny=DIR is the documented spelling; map it onto the config global
    argv = [a.replace("--init_tiny=", "--init_tiny_dir=", 1) for a in sys.argv[1:]]
    apply_overrides(globals(), argv)
    cfg = config_of(globals())
    rank, local_rank, world, device = setup_dist()
    master_process = rank == 0
    print0("config:", json.dumps(cfg))

    # --- tiny checkpoint
    if init_tiny_dir:
        if master_process:
            n = init_tiny(init_tiny_dir, data, seed)
            print(f"wrote tiny Qwen2.5-VL ({n / 1e6:.2f}M params) to {init_tiny_dir}")
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        sys.exit(0)

    # --- forward check: each rank runs its share of the samples through the full input path
    torch.manual_seed(seed)
    net, processor = load_model(model, dtype, device)
    net.eval()
    recs = load_records(data)[:max_samples]
    pad_id = processor.tokenizer.pad_token_id
    losses, n_tok, t0 = [], 0, time.time()
    for rec in recs[rank::world]:
        frames, info = load_video(rec["video"], num_frames=num_frames)
        batch = collate_sft([encode_sample(processor, rec, frames, info)], pad_id)
        with torch.no_grad():
            out = net(**model_inputs(batch, device))
        losses.append(out.loss.item())
        n_tok += batch["input_ids"].numel()
        print(f"[rank {rank}] {rec['id']} ({rec['category']}): {batch['input_ids'].shape[1]} tokens "
              f"({int((batch['mm_token_type_ids'] == 2).sum())} video), loss {losses[-1]:.4f}", flush=True)
    stats = torch.tensor([sum(losses), len(losses), n_tok], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats)  # this is a sync point: every rank must reach it
    dt = time.time() - t0
    print0(f"forward check: {int(stats[1])} samples on {world} rank(s), mean loss {stats[0] / max(stats[1], 1):.4f} "
           f"(random init: ~ln(vocab)={torch.log(torch.tensor(float(net.config.text_config.vocab_size))):.2f}), "
           f"{stats[2] / dt:.0f} tokens/s")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
