from conftest import make_tokenizer
from saft.data import Sample
from saft.render import encode, prompt_text

S = Sample("a", [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}])


def test_chat_template_boundary():
    tok = make_tokenizer()
    e = encode(S, tok)
    assert tok.decode(e.ids[:e.prompt_len]) == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(e.ids[e.prompt_len:]).startswith("hello<|im_end|>")
    assert prompt_text(S.messages[:-1], tok) == tok.decode(e.ids[:e.prompt_len])


def test_plain_template_without_chat_template():
    tok = make_tokenizer(chat_template=None)
    e = encode(S, tok)
    assert tok.decode(e.ids[:e.prompt_len]) == "User: hi there\n\nAssistant: "
    assert tok.decode(e.ids[e.prompt_len:]) == "hello<|im_end|>"


def test_truncation_keeps_prompt_end_and_some_response():
    tok = make_tokenizer()
    long = Sample("b", [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "yes " * 50}])
    e = encode(long, tok, max_length=40)
    assert e.truncated and len(e.ids) == 40 and e.response_len == 10
    assert tok.decode(e.ids[:e.prompt_len]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(e.ids[e.prompt_len:]) == "yes yes ye"
    short = encode(Sample("c", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes " * 50}]),
                   tok, max_length=40)
    assert short.prompt_len == encode(short_s := Sample("c", [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]), tok).prompt_len
    assert len(short.ids) == 40 and not encode(short_s, tok).truncated
