"""Chat templates by name: the well-known turn formats, as Jinja for transformers' `apply_chat_template`.

Each is written from the format's public description (the names are those mergekit ships). transformers renders
with `trim_blocks` and `lstrip_blocks`, so every newline of the output sits inside a quoted string, never after a
`{% ... %}` tag.
"""
from __future__ import annotations

# <|im_start|>role\ncontent<|im_end|>\n per message; the reply opens with <|im_start|>assistant\n
CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# bos, then <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> per message (content trimmed)
LLAMA3 = ("{{ bos_token }}"
          "{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
          " + '<|eot_id|>' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# a system message as the preamble, then ### Instruction: / ### Response: blocks; a reply ends with eos
ALPACA = ("{% for message in messages %}"
          "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
          "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
          "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
          "{% endif %}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}")

# bos, then [INST] user [/INST]reply</s> per exchange; a system message opens the first instruction. The model
# answers right after [/INST], so there is no generation prompt.
MISTRAL = ("{% if messages and messages[0]['role'] == 'system' %}"
           "{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
           "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
           "{{ bos_token }}"
           "{% for message in turns %}"
           "{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
           "{% else %}{{ message['content'] + eos_token }}{% endif %}"
           "{% endfor %}")

# EXAONE's [|role|] markers: system and assistant turns end with [|endofturn|], user turns with a newline
EXAONE = ("{% for message in messages %}"
          "{% if message['role'] == 'user' %}{{ '[|user|]' + message['content'] + '\n' }}"
          "{% else %}{{ '[|' + message['role'] + '|]' + message['content'] + '[|endofturn|]\n' }}"
          "{% endif %}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}")

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA, "mistral": MISTRAL, "exaone": EXAONE}
