"""Regenerate the tokenizer goldens from HF transformers / tokenizers (the `peers` extra; CI never runs this).

    .venv/bin/python tests/goldens/make_tokenizer_goldens.py

Writes, next to this file:
  tokenizer_smollm2.json     SmolLM2's token ids, decodes and rendered chats for a varied text set
  tokenizer_smollm2_hf/      SmolLM2's tokenizer as an HF directory (tokenizer.json, tokenizer_config.json)
  tokenizer_tiny.json        ids from a tiny BPE trained here, with the tokenizer.json options SmolLM2 lacks
  tokenizer_tiny_hf/         that tiny tokenizer as an HF directory

The SmolLM2 reference is transformers' own tokenizer for the GGUF (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`) with one correction. transformers' GGUF converter does not know `tokenizer.ggml.pre = "smollm"`
and falls back to GPT-2's split, while SmolLM2's published tokenizer.json (and llama.cpp for "smollm") split
every digit off first: Sequence[Digits(individual_digits=True), ByteLevel]. The two differ on whitespace before a
digit ("a  1": GPT-2 split gives 'a' 'Ġ' 'Ġ' '1', the model's tokenizer 'a' 'ĠĠ' '1'). The goldens use the model's
published pipeline and also record the uncorrected ids, and where they differ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import regex
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, \
    trainers
from transformers import AutoTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from simpo_worker.weights.smollm2 import smollm2_gguf_path

HERE = Path(__file__).resolve().parent

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "don't won't I'm you're they've we'll she'd IT'S DON'T",
    "Numbers: 0 7 42 1234 31415926535897932384626433832795 1,000,000.50 -3.14e-10 0x1F",
    "a  1 x   2024\t\t3\n\n42  12   123",
    "Phone: +1 (555) 123-4567, year 1999, version v2.10.3",
    "   leading spaces and trailing spaces   ",
    "multiple     spaces\tand\ttabs\t\tand\n\n\nnewlines\r\nwindows\rold mac",
    "\n",
    " ",
    "",
    "Café, naïve, résumé, São Paulo, Zürich, façade, Ångström, Øresund, œuvre",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 🎉🚀👍🏽 👨‍👩‍👧‍👦 ❤️ 🇫🇷 and text",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी, ไทย",
    "Superscripts x² y³ ½ ¼, Arabic-Indic ١٢٣, full-width ３４５, Roman Ⅻ",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i] * b[i]; }  // dot product",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "<div class=\"x\">Hello &amp; goodbye</div>  <br/>",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "$$\\int_0^\\infty e^{-x^2} dx = \\frac{\\sqrt{\\pi}}{2}$$",
    "https://example.com/path?query=1&other=two#frag user@example.org",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "text before<|endoftext|>text after",
    "<|im_start|><|im_end|><|endoftext|>",
    "<repo_name>simpo<file_sep>main.py<filename>x<gh_stars>10",
    "not special: <|im_start |> <im_end> <|im_end <|endoftext|",
    "Control chars: \x00 \x01 \x07 \x1b[31m red \x1b[0m \x1c\x1d\x1e\x1f \x7f",
    "Unicode spaces:\u00a0nbsp\u2003em\u2009thin\u3000ideographic\u2028line\u2029para\u0085nel",
    "Combining: e\u0301 a\u0308 n\u0303 vs é ä ñ; zero width\u200bspace\u200djoiner\ufeffbom",
    "Punctuation!!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}} ||| ~~~",
    "Mixed123abc456DEF789 snake_case_name camelCaseName kebab-case-name SCREAMING_CASE",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    " " * 40 + "indented" + "\n" * 5 + "\t" * 6 + "x",
    "The year 2024 had 366 days; 3.5% of 1,234 is 43.19.",
    "Quotes: ‘single’ “double” «guillemets» „low“ 「括弧」",
    "Math: ∀x∈ℝ, x² ≥ 0; ∑ᵢ aᵢ ≤ ∞; √2 ≈ 1.41421356; π ≠ 3",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris.",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12*12?"},
     {"role": "assistant", "content": "144."}, {"role": "user", "content": "And 13*13?"}],
    [{"role": "user", "content": "Write a haiku about snow.\n\nMake it sad."},
     {"role": "assistant", "content": "White silence falling\n   on the empty road home —\nno footprints but mine"}],
    [{"role": "user", "content": "Translate «bonjour» to 日本語 🎌"}, {"role": "assistant", "content": "こんにちは"}],
    [{"role": "user", "content": "Code:\n```python\nprint('hi')\t# tab\n```"},
     {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "Say <|im_end|> literally"}],
]

# A template in the style of Llama-2's: bos_token/eos_token variables, raise_exception, loop controls, tojson.
CUSTOM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = false %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system %}{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n'"
    " + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% if loop.last and message['content'] | length > 1000 %}{% break %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ' }}{% endif %}"
    "{{ '\\n<!-- ' + (messages | length | tojson) + ' ' + ({'note': 'é'} | tojson) + ' -->' }}"
)


def published_pre_tokenizer():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def smollm2_goldens() -> None:
    gguf = smollm2_gguf_path()
    hf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    uncorrected = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    hf.backend_tokenizer.pre_tokenizer = published_pre_tokenizer()

    texts = []
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        texts.append({
            "text": text,
            "ids": ids,
            "ids_with_special_tokens": hf.encode(text, add_special_tokens=True),
            "transformers_gguf_ids": uncorrected.encode(text, add_special_tokens=False).ids,
            "decoded": hf.decode(ids),
            "decoded_skip_special": hf.decode(ids, skip_special_tokens=True),
            # Every prefix of the ids, so some end in the middle of a multi-byte character.
            "prefix_decodes": [hf.backend_tokenizer.decode(ids[:k], skip_special_tokens=False)
                               for k in range(1, len(ids) + 1)] if len(ids) <= 80 else [],
        })
    chats = []
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            chats.append({"messages": messages, "add_generation_prompt": add_generation_prompt,
                          "rendered": rendered, "ids": hf.encode(rendered, add_special_tokens=False)})
    custom = []
    for messages in CONVERSATIONS[:4]:
        for add_generation_prompt in (False, True):
            rendered = hf.apply_chat_template(messages, chat_template=CUSTOM_TEMPLATE, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
            custom.append({"messages": messages, "add_generation_prompt": add_generation_prompt,
                           "rendered": rendered})
    not_alternating = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    try:
        hf.apply_chat_template(not_alternating, chat_template=CUSTOM_TEMPLATE, tokenize=False)
        raise SystemExit("expected the custom template to reject non-alternating roles")
    except jinja2.TemplateError as e:
        rejection = {"messages": not_alternating, "message": str(e)}

    divergent = [t["text"] for t in texts if t["ids"] != t["transformers_gguf_ids"]]
    for text in divergent:  # the only known cause: whitespace split differently before a number
        assert regex.search(r"\s\p{N}", text), f"unexplained divergence from transformers' GGUF path: {text!r}"
    golden = {
        "generator": f"transformers {transformers.__version__}, {Path(__file__).name}",
        "gguf": gguf.name,
        "bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id, "pad_token_id": hf.pad_token_id,
        "vocab_size": len(hf),
        # The ids skip_special_tokens drops (all 17 control tokens; `all_special_ids` lists only the named ones).
        "special_ids": sorted(i for i, t in hf.backend_tokenizer.get_added_tokens_decoder().items() if t.special),
        "texts": texts, "chats": chats, "custom_template": CUSTOM_TEMPLATE, "custom_chats": custom,
        "custom_rejection": rejection,
        "texts_where_transformers_gguf_path_differs": divergent,
    }
    write_json(HERE / "tokenizer_smollm2.json", golden)

    out = HERE / "tokenizer_smollm2_hf"
    shutil.rmtree(out, ignore_errors=True)
    hf.save_pretrained(str(out))
    # Compact (1.6 MB instead of 3.5 MB indented): it is committed to the repo.
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    print(f"SmolLM2: {len(texts)} texts, {len(chats)} chats, {len(divergent)} texts differ on transformers' GGUF "
          f"path; saved {sorted(p.name for p in out.iterdir())}")


LLAMA3_STYLE_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                      r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def tiny_goldens() -> None:
    """A tiny BPE with the options SmolLM2's tokenizer.json lacks: NFC normalizer, a Split regex, ByteLevel with a
    prefix space and no regex, a BOS added by the post-processor, and a non-special added token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_STYLE_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TEXTS * 3, trainer=trainer)
    tokenizer.add_tokens([AddedToken("<tool>", normalized=False, special=False)])
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", bos)])
    out = HERE / "tokenizer_tiny_hf"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>",
              "chat_template": CUSTOM_TEMPLATE}
    write_json(out / "tokenizer_config.json", config)

    texts = [*TEXTS, "call <tool>search</tool> now", "<s>already has bos</s>"]
    # The same vocabulary as a GGUF would describe it with other `tokenizer.ggml.pre` names: transformers' split
    # for that name (its GGUF converter), plus ignore_merges where the model's own tokenizer.json has it (Llama 3).
    by_pre = {}
    for pre, ignore_merges in (("llama-bpe", True), ("qwen2", False)):
        spec = json.loads(tokenizer.to_str())
        spec["model"]["ignore_merges"] = ignore_merges
        variant = Tokenizer.from_str(json.dumps(spec))
        variant.normalizer = None
        variant.post_processor = None
        variant.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        by_pre[pre] = [variant.encode(t, add_special_tokens=False).ids for t in texts]
    golden = {
        "generator": f"tokenizers (via transformers {transformers.__version__}), {Path(__file__).name}",
        "bos_token_id": bos, "eos_token_id": tokenizer.token_to_id("</s>"),
        "pad_token_id": tokenizer.token_to_id("<pad>"), "vocab_size": tokenizer.get_vocab_size(),
        "texts": [{"text": t, "ids": tokenizer.encode(t, add_special_tokens=False).ids,
                   "ids_with_special_tokens": tokenizer.encode(t, add_special_tokens=True).ids,
                   "decoded": tokenizer.decode(tokenizer.encode(t, add_special_tokens=True).ids,
                                               skip_special_tokens=False)} for t in texts],
        "gguf_pre_tokenizer_ids": by_pre,
    }
    write_json(HERE / "tokenizer_tiny.json", golden)
    print(f"tiny: vocab {golden['vocab_size']}, {len(texts)} texts")


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    smollm2_goldens()
    tiny_goldens()
