"""Tiny random-weight Hugging Face models with a real byte-level BPE tokenizer, for tests and demos."""

from __future__ import annotations

import functools
import pathlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

DEMO_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

TOKENIZER_VOCAB_SIZE = 1000
# Pairs seen only once are not merged, so rare multi-byte characters stay split over byte tokens.
TOKENIZER_MIN_FREQUENCY = 2
TOKENIZER_MODEL_MAX_LENGTH = 512

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Larger than the HF default (0.02) so logits spread over several units and greedy argmax is stable.
INITIALIZER_RANGE = 0.2
RMS_NORM_EPS = 1e-6
# HF zero-initializes biases and sets norm weights to one; perturb them so engines must load them right.
BIAS_INIT_STD = 0.1
NORM_WEIGHT_INIT_STD = 0.1
NORM_WEIGHT_INIT_MEAN = 1.0

LLAMA_ROPE_THETA = 500000.0
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
MISTRAL_ROPE_THETA = 10000.0
MISTRAL_SLIDING_WINDOW = 16
QWEN_ROPE_THETA = 1000000.0
# Qwen3's head_dim is made deliberately different from hidden_size // num_heads.
QWEN3_HEAD_DIM_EXTRA = 8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEMO_NAME_PREFIX = "demo-"
DEFAULT_HIDDEN_SIZE = 64
DEFAULT_INTERMEDIATE_SIZE = 128
DEMO_HIDDEN_STEP = 32
DEMO_INTERMEDIATE_MULTIPLIER = 2

DEMO_CORPUS = """\
The old lighthouse stood at the edge of the harbor, and every night its keeper climbed the
spiral stairs to light the lamp. Ships passing in the dark would see the beam sweep across
the water, and they would know that the rocks were near and that home was not far away.

In the morning the market opened early. Farmers brought baskets of apples, pears, and plums;
the baker set out loaves of warm bread; and children ran between the stalls, asking for a
taste of honey or a handful of cherries. By noon the square was full of voices and laughter.

A computer program is a list of instructions that a machine can follow. The instructions are
written in a programming language, such as Python, which is then run by an interpreter. Good
programs are easy to read, easy to test, and easy to change when the requirements change.

Large language models predict the next token in a sequence. A tokenizer splits the text into
tokens, the model computes a probability for every token in its vocabulary, and a sampler
picks one. The chosen token is appended to the sequence, and the process repeats until the
model emits an end-of-text token or reaches the maximum number of tokens allowed.

When many models share a small pool of accelerators, the server must decide which model runs
next. If it switches too often, time is lost loading weights; if it switches too rarely,
requests wait in the queue and the latency grows. A careful scheduler balances the two.

She opened the window and listened to the rain. It fell softly on the roof, on the garden,
on the quiet street below. Somewhere a dog barked, and then everything was still again. She
made a cup of tea, sat down by the fire, and began to read the letter for the second time.

The river runs from the mountains to the sea. In spring it is wide and fast, carrying snow
melt and branches; in late summer it is slow and clear, and you can see the stones on the
bottom and the small fish that hide in the shadows beneath the bridge.

Mathematics is the study of numbers, shapes, and patterns. One plus one is two; two times
three is six; the square root of sixteen is four. A prime number has exactly two divisors,
and there are infinitely many of them: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, and so on.

"Where are you going?" asked the fox. "To the city," answered the rabbit, "to find work and
to see the tall towers I have heard so much about." The fox laughed. "Be careful, my friend.
The city is loud, and not everyone there is as kind as you are."

History teaches us that great changes often begin with small steps. A single idea, shared
between friends, can grow into a movement; a single invention can change the way people live,
work, travel, and talk to one another across great distances.

The recipe is simple. Mix two cups of flour with a pinch of salt, add one cup of water and a
spoon of oil, and knead the dough for ten minutes. Let it rest for an hour, then roll it out,
cut it into strips, and cook them in boiling water for three minutes.

Every good story has a beginning, a middle, and an end. The beginning introduces the people
and the place; the middle brings trouble and tests their courage; and the end shows what they
have learned, what they have lost, and what they have gained along the way.

The train left the station at seven in the morning. Through the window the passengers watched
the fields go by: green fields, yellow fields, fields of wheat and corn, and now and then a
small village with a church, a school, and a row of houses along the road. The conductor
walked through the cars, checking tickets and answering questions about the next stop.

Scientists measure the world with care. They write down what they observe, they propose an
explanation, and they design an experiment to test it. If the results agree with the
prediction, the explanation gains support; if they do not, the scientists must think again.
Careful measurement, honest reporting, and open discussion are the heart of the method.

In the winter the village was quiet. Snow covered the roofs and the roads, and the people
stayed inside, near their stoves, telling stories and mending their tools. When the weather
cleared, the children went out with their sleds and raced down the hill behind the mill,
shouting and laughing until the sun went down and their mothers called them home for supper.

A good teacher listens before speaking. She asks her students what they already know, what
they find difficult, and what they would like to learn next. Then she builds each lesson on
what they know, one step at a time, so that every student can follow and nobody is left behind.

The engineers met on Monday to review the design. They discussed memory, speed, and cost;
they compared three options and wrote down the strengths and weaknesses of each. In the end
they chose the simplest option, because it was the easiest to build, to test, and to explain
to the people who would have to maintain the system for many years to come.

Birds build their nests in the spring. The robin gathers grass and mud, the swallow uses clay
from the riverbank, and the sparrow finds a hole under the roof of an old barn. Soon the eggs
hatch, and the parents fly back and forth all day long, bringing food to their hungry young.

The library was open until nine. Students sat at the long wooden tables, reading, writing, and
whispering to one another; the librarian walked between the shelves, returning books to their
places; and outside the tall windows the street lamps came on, one after another, in the dusk.

Money is a tool for trade. Before money, people exchanged goods directly: a basket of fish for a
pair of shoes, a sack of grain for a wool blanket. Money made trade easier, because a farmer
could sell grain today and buy shoes next month, from a different person, in a different town.

The doctor listened to his heart, looked at his throat, and asked how long he had been feeling
tired. "Rest for a few days," she said, "drink plenty of water, and come back next week if you
do not feel better." He thanked her, put on his coat, and walked slowly home through the park.

Numbers in a computer are stored as bits. A byte holds eight bits and can represent two hundred
and fifty six different values. Text is stored as a sequence of bytes, and an encoding such as
UTF-8 decides how each character maps to one, two, three, or four of those bytes.

Gardening requires patience. You prepare the soil, plant the seeds, water them every evening,
and wait. Some weeks nothing seems to happen; then one morning small green leaves appear, and
before long there are tomatoes, beans, peppers, and flowers of every color in the garden beds.

The captain studied the charts by the light of a lantern. The wind had changed during the night,
the waves were growing taller, and the harbor was still forty miles to the north. He ordered the
crew to reef the sails, checked the compass once more, and set a course along the rocky coast.

Music is made of sound and silence. A melody rises and falls; a rhythm keeps the time; harmony
adds depth and color. Musicians practice for years to play together, listening closely to one
another, so that the orchestra sounds like a single instrument with a hundred different voices.

Servers answer requests from clients. A client sends a message over the network, the server
reads it, does some work, and writes a response. When thousands of clients connect at once, the
server must share its memory and processors fairly, so that every request finishes quickly.

Cities grow around rivers, roads, and ports. Merchants arrive to buy and sell, workers follow
to build houses and factories, and soon there are schools, hospitals, theaters, and parks. Each
generation adds new buildings and tears down old ones, and the city slowly changes its shape.

The storm passed before dawn. Fallen branches lay across the path, puddles shone in the grass,
and the air smelled fresh and clean. Neighbors came out of their houses to look at the damage,
to help each other clear the roads, and to share coffee, bread, and news of the long night.

Some words are borrowed from other languages: a café on the corner, a naïve question, a
résumé on the desk, a piñata at the party. Japanese is written as 日本語, and a smile can be
sent as 🙂 in a short message.
"""


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE tokenizer once per process and return its serialized JSON."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=TOKENIZER_MIN_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(DEMO_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return a fresh copy of the demo byte-level BPE tokenizer with a ChatML chat template."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        model_max_length=TOKENIZER_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _build_config(
    arch: str,
    *,
    vocab_size: int,
    eos_token_id: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
) -> PretrainedConfig:
    """Build the transformers config for one demo architecture with its distinctive features."""
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": INITIALIZER_RANGE,
        "rms_norm_eps": RMS_NORM_EPS,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    }
    if arch == "llama":
        return LlamaConfig(
            **common,
            rope_theta=LLAMA_ROPE_THETA,
            rope_scaling=dict(LLAMA3_ROPE_SCALING),
            tie_word_embeddings=False,
        )
    if arch == "mistral":
        return MistralConfig(
            **common,
            rope_theta=MISTRAL_ROPE_THETA,
            sliding_window=MISTRAL_SLIDING_WINDOW,
            tie_word_embeddings=False,
        )
    if arch == "qwen2":
        return Qwen2Config(**common, rope_theta=QWEN_ROPE_THETA, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(
            **common,
            rope_theta=QWEN_ROPE_THETA,
            head_dim=hidden_size // num_heads + QWEN3_HEAD_DIM_EXTRA,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown demo architecture {arch!r}; expected one of {DEMO_ARCHITECTURES}")


def _randomize_constant_parameters(model: PreTrainedModel) -> None:
    """Give biases, norm weights and the pad token's embedding random values (HF initializes them to
    constants). A zero pad row, with tied embeddings and pad = eos, would pin eos's logit at 0 and the
    model would never stop on its own."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, BIAS_INIT_STD)
            elif "norm" in name.rsplit(".", 2)[-2]:
                param.normal_(NORM_WEIGHT_INIT_MEAN, NORM_WEIGHT_INIT_STD)
        pad = model.config.pad_token_id
        if pad is not None:
            model.get_input_embeddings().weight[pad].normal_(0.0, INITIALIZER_RANGE)


def write_demo_model(
    path: str | pathlib.Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype: str = "float32",
    hidden_size: int = DEFAULT_HIDDEN_SIZE,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = DEFAULT_INTERMEDIATE_SIZE,
    max_position_embeddings: int = 512,
    max_shard_bytes: int | None = None,
) -> pathlib.Path:
    """Write a complete random-weight HF model directory (config, weights, tokenizer) and return it."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = _build_config(
        arch,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        _randomize_constant_parameters(model)
    model = model.to(DTYPES[dtype])
    save_kwargs = {"safe_serialization": True}
    if max_shard_bytes is not None:
        save_kwargs["max_shard_size"] = max_shard_bytes
    model.save_pretrained(path, **save_kwargs)
    tokenizer.save_pretrained(path)
    generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    generation_config.save_pretrained(path)
    return path


def write_demo_models(directory: str | pathlib.Path, count: int = 3, *, seed: int = 0) -> list[pathlib.Path]:
    """Write `count` demo models named demo-<arch>[-<n>] into `directory`, cycling architectures."""
    directory = pathlib.Path(directory)
    paths = []
    for index in range(count):
        arch = DEMO_ARCHITECTURES[index % len(DEMO_ARCHITECTURES)]
        round_index = index // len(DEMO_ARCHITECTURES)
        suffix = "" if round_index == 0 else f"-{round_index + 1}"
        name = f"{DEMO_NAME_PREFIX}{arch}{suffix}"
        hidden_size = DEFAULT_HIDDEN_SIZE + round_index * DEMO_HIDDEN_STEP
        paths.append(
            write_demo_model(
                directory / name,
                arch,
                seed=seed + index,
                hidden_size=hidden_size,
                intermediate_size=hidden_size * DEMO_INTERMEDIATE_MULTIPLIER,
            )
        )
    return paths


def ensure_small_models(
    directory: str | pathlib.Path,
    prefix: str,
    count: int,
    hidden_size: int,
    num_layers: int,
    max_position: int,
) -> dict[str, pathlib.Path]:
    """`count` models named <arch>-<i> (architectures cycling) in `directory`, written once, reused after.

    What the live benchmarks run: small enough for a CPU, large enough that a step costs something.
    """
    models = {}
    for index in range(count):
        arch = DEMO_ARCHITECTURES[index % len(DEMO_ARCHITECTURES)]
        path = pathlib.Path(directory) / f"{prefix}-{arch}-{index}"
        if not (path / "config.json").is_file():
            write_demo_model(
                path,
                arch,
                seed=index,
                hidden_size=hidden_size,
                intermediate_size=2 * hidden_size,
                num_layers=num_layers,
                max_position_embeddings=max_position,
            )
        models[f"{arch}-{index}"] = path
    return models


# The benchmark model: Llama-shaped, about 100M parameters (400 MB in float32).
BENCHMARK_MODEL_SHAPE = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rope_theta=500000.0,
)


def ensure_benchmark_model(path: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write the random-weight benchmark model to `path` unless it is already there."""
    path = pathlib.Path(path)
    if (path / "config.json").is_file():
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LlamaConfig(**BENCHMARK_MODEL_SHAPE, architectures=["LlamaForCausalLM"])
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path
