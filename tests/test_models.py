import torch

from runner.config import validate
from runner.models import gguf_path, load_policy, prepared_dir


def test_cached_conversion_has_the_gguf_logits():
    """The safetensors cache must be the same model as the packaged GGUF."""
    from transformers import AutoModelForCausalLM

    cfg = validate({}).model  # the default: smollm2_135m from the GGUF
    model, tok = load_policy(cfg)
    src = gguf_path(cfg.gguf_package, cfg.gguf_file)
    ref = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    ids = tok("roll a dice. <answer>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (prepared_dir(cfg.gguf_package, cfg.gguf_file) / "model.safetensors").exists()


def test_model_path_loads_any_local_hf_directory(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = validate({"model": {"name": "tiny", "source": "tiny", "path": str(tmp_path)}}).model
    assert cfg.source == "pretrained"
    loaded, tok2 = load_policy(cfg)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tok2.padding_side == "left" and len(tok2) == len(tok)
