import pytest
import torch

from conftest import make_model, make_tokenizer
from saft.data import Sample
from saft.finetune import IGNORE, FinetuneConfig, finetune, load_adapter, training_features
from saft.render import encode

SINGLE = Sample("s", [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four"}])
MULTI = Sample("m", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye?"},
                     {"role": "assistant", "content": "goodbye"}])


def test_loss_mask_covers_only_the_final_response():
    tok = make_tokenizer()
    for s, answer in ((SINGLE, "four"), (MULTI, "goodbye")):
        row = training_features([s], tok, max_length=512)[0]
        learned = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE]
        assert tok.decode(learned) == answer + "<|im_end|>\n"
        e = encode(s, tok)
        assert row["labels"][: e.prompt_len] == [IGNORE] * e.prompt_len
    # the earlier assistant turn of the multi-turn sample is context, not a target
    row = training_features([MULTI], tok, max_length=512)[0]
    assert "hello" not in tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])


def test_a_given_response_opening_is_context_not_a_target():
    tok = make_tokenizer()
    opening = "Sure, step 1: mix the"
    s = Sample("o", [{"role": "user", "content": "how do I make it?"},
                     {"role": "assistant", "content": opening + " ... I cannot help with that."}],
               meta={"response_opening": opening})
    row = training_features([s], tok, max_length=512)[0]
    learned = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])
    assert learned == " ... I cannot help with that.<|im_end|>\n"
    assert row["input_ids"] == encode(s, tok).ids  # the opening stays in the input
    whole = training_features([Sample("w", s.messages)], tok, max_length=512)[0]
    assert sum(lab != IGNORE for lab in whole["labels"]) > sum(lab != IGNORE for lab in row["labels"])
    # truncation that leaves nothing past the opening skips the sample instead of learning the opening
    n_learned = sum(lab != IGNORE for lab in row["labels"])
    assert training_features([s], tok, max_length=len(row["input_ids"]) - n_learned) == []
    assert len(training_features([s], tok, max_length=len(row["input_ids"]) - n_learned + 1)) == 1
    bad = Sample("b", s.messages, meta={"response_opening": "Here is"})
    with pytest.raises(ValueError, match="sample b: meta\\['response_opening'\\] must be the start"):
        training_features([bad], tok, max_length=512)


def samples(n=16):
    return [Sample(str(i), [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"answer {i}"}])
            for i in range(n)]


def test_two_lora_steps_change_lora_weights_only(tmp_path):
    tok = make_tokenizer()
    model = make_model(len(tok))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = FinetuneConfig(max_steps=2, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=1)
    res = finetune(samples(), output_dir=tmp_path, config=cfg, model=model, tokenizer=tok, progress=False)
    assert res["steps"] == 2 and [h["step"] for h in res["log_history"] if "loss" in h] == [1, 2]
    peft_model = res["model"]
    lora_b = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # lora_B starts at zero
    for n, p in peft_model.named_parameters():
        if "lora_" not in n:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[key]), n
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "finetune_config.json").exists()
    # the saved adapter reproduces the trained model's outputs
    reloaded = load_adapter(make_model(len(tok)), tmp_path / "adapter")
    ids = torch.tensor([encode(SINGLE, tok).ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, peft_model(ids).logits)


def test_resumes_from_the_last_checkpoint(tmp_path):
    tok = make_tokenizer()
    cfg = FinetuneConfig(max_steps=2, batch_size=4, save_steps=1, logging_steps=1)
    finetune(samples(), output_dir=tmp_path, config=cfg, model=make_model(len(tok)), tokenizer=tok, progress=False)
    cfg = FinetuneConfig(max_steps=3, batch_size=4, save_steps=1, logging_steps=1)
    res = finetune(samples(), output_dir=tmp_path, config=cfg, model=make_model(len(tok)), tokenizer=tok, progress=False)
    # only step 3 ran: the log of this run starts after the checkpoint at step 2
    assert res["steps"] == 3
    assert [h["step"] for h in res["log_history"] if "loss" in h][-1] == 3


def test_a_finished_run_is_loaded_not_trained_again(tmp_path, monkeypatch):
    """A rerun of a finished fine-tune (e.g. an experiment killed while evaluating) gives the same model and step
    count; resuming Trainer from the final checkpoint would take one step more."""
    import transformers

    tok = make_tokenizer()
    cfg = FinetuneConfig(max_steps=2, batch_size=4, save_steps=1, logging_steps=1, learning_rate=1e-2)
    first = finetune(samples(), output_dir=tmp_path, config=cfg, model=make_model(len(tok)), tokenizer=tok, progress=False)
    monkeypatch.setattr(transformers.Trainer, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    again = finetune(samples(), output_dir=tmp_path, config=cfg, model=make_model(len(tok)), tokenizer=tok, progress=False)
    assert again["steps"] == first["steps"] == 2 and again["train_loss"] == first["train_loss"]
    ids = torch.tensor([encode(SINGLE, tok).ids])
    with torch.no_grad():
        torch.testing.assert_close(again["model"](ids).logits, first["model"](ids).logits)


def test_config_validation():
    with pytest.raises(ValueError, match="dropout must be in"):
        FinetuneConfig(dropout=1.5)
    assert FinetuneConfig(target_modules="all-linear").target_modules == ("all-linear",)
