"""The major chat-template families for tests: each family's chat template (the official Jinja template of its
instruct models, tool-calling branches left out), a small BPE tokenizer carrying its special tokens, and a
tiny random model of its architecture.

The Hub is unreachable here, so the tokenizers are trained on the shared chat data like `chatml_tokenizer`
(`tests/conftest.py`); role names are not single tokens (`assistant`, `model` split into pieces), the harder
case for positions. `FAMILIES` lists what each family's `special` position mode must mark.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from tests.conftest import read_conversations

# -- the templates (from the models' tokenizer_config.json; only the non-tool branches) ---------------------
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

MISTRAL_V03_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- set ns.index = ns.index + 1 %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFamily:
    """One chat-template family: its template and tokens, the architecture it ships with, and what the
    `special` position mode and the paper's Table 11 set (`train.evaluate.paper_st_tokens`) must hold."""

    name: str
    arch: str  # transformers model_type of the tiny model
    template: str
    specials: tuple[str, ...]  # special tokens of the tokenizer, ids 0, 1, ...
    bos: str | None
    eos: str
    pad: str
    marked: tuple[str, ...]  # the special tokens `resolve_special_tokens` finds (sorted)
    table11: tuple[str, ...]  # the special tokens of the Table 11 set (sorted)
    roles: dict[str, str]  # role -> the name the template spells after its special token
    added: tuple[str, ...] = ()  # added tokens not flagged special (Qwen3's <think>)
    # native | folded (the template folds it into the first user turn) | last-user (Mistral v0.3: into the last
    # user turn, so a finished conversation loses it) | raises (Gemma 2; training folds it like Gemma 3)
    system: str = "native"
    seed: int = 0  # the tiny model's seed: one whose greedy replies a special-position edit changes


_LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_GEMMA = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
_GEMMA_ROLES = {"user": "user", "assistant": "model"}
_PHI = ("<|endoftext|>", "<unk>", "<s>", "</s>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>")
_ALL_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}

FAMILIES = {
    f.name: f
    for f in [
        ChatFamily("llama3", "llama", LLAMA31_TEMPLATE, _LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>",
                   marked=("<|begin_of_text|>", "<|end_header_id|>", "<|eot_id|>", "<|start_header_id|>"),
                   table11=("<|end_header_id|>", "<|eot_id|>", "<|start_header_id|>"), roles=_ALL_ROLES, seed=1),
        ChatFamily("qwen2.5", "qwen2", QWEN25_TEMPLATE, _CHATML, None, "<|im_end|>", "<|endoftext|>",
                   marked=("<|im_end|>", "<|im_start|>"), table11=("<|im_end|>", "<|im_start|>"),
                   roles=_ALL_ROLES),
        ChatFamily("qwen3", "qwen3", QWEN3_TEMPLATE, _CHATML, None, "<|im_end|>", "<|endoftext|>",
                   marked=("</think>", "<think>", "<|im_end|>", "<|im_start|>"),
                   table11=("</think>", "<think>", "<|im_end|>", "<|im_start|>"), roles=_ALL_ROLES,
                   added=("<think>", "</think>")),
        ChatFamily("gemma2", "gemma2", GEMMA2_TEMPLATE, _GEMMA, "<bos>", "<eos>", "<pad>",
                   marked=("<bos>", "<end_of_turn>", "<start_of_turn>"), table11=("<end_of_turn>", "<start_of_turn>"),
                   roles=_GEMMA_ROLES, system="raises"),
        ChatFamily("gemma3", "gemma3_text", GEMMA3_TEMPLATE, _GEMMA, "<bos>", "<eos>", "<pad>",
                   marked=("<bos>", "<end_of_turn>", "<start_of_turn>"), table11=("<end_of_turn>", "<start_of_turn>"),
                   roles=_GEMMA_ROLES, system="folded"),
        ChatFamily("mistral", "mistral", MISTRAL_V03_TEMPLATE, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>",
                   "</s>", "</s>", marked=("</s>", "<s>", "[/INST]", "[INST]"), table11=("</s>", "[/INST]", "[INST]"),
                   roles={}, system="last-user"),
        ChatFamily("phi3", "phi3", PHI3_TEMPLATE, _PHI, "<s>", "<|endoftext|>", "<|endoftext|>",
                   marked=("<|assistant|>", "<|end|>", "<|endoftext|>", "<|system|>", "<|user|>"),
                   table11=("<|assistant|>", "<|end|>", "<|user|>"), roles={}, seed=1),
        ChatFamily("phi4-mini", "phi3", PHI4_MINI_TEMPLATE, _PHI, "<|endoftext|>", "<|endoftext|>",
                   "<|endoftext|>", marked=("<|assistant|>", "<|end|>", "<|endoftext|>", "<|system|>", "<|user|>"),
                   table11=("<|assistant|>", "<|end|>", "<|user|>"), roles={}),
    ]
}  # fmt: skip
NAMES = tuple(FAMILIES)


@cache
def family_tokenizer(name: str):
    """A byte-level BPE tokenizer (vocabulary 640) with family `name`'s special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for conv in read_conversations(n=300) for m in conv]
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        special_tokens=list(family.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad
    )
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.added])
    fast.chat_template = family.template
    return fast


def family_model(name: str, n_layers: int = 4, d_model: int = 64, sliding_window: int = 16):
    """A tiny random causal LM of family `name`'s architecture, float32, in eval mode. Gemma's layers alternate
    sliding-window (`sliding_window` tokens: by default prompts outgrow it) and full attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    family, tok = FAMILIES[name], family_tokenizer(name)
    extra = {}
    if "gemma" in family.arch:
        layer_types = ["sliding_attention", "full_attention"] * n_layers
        extra = {
            "sliding_window": sliding_window,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "layer_types": layer_types[:n_layers],
        }
    cfg = AutoConfig.for_model(
        family.arch,
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(family.seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
