"""End to end: checkpoints written by the real writers load bit-identically to the libraries' own loaders.

transformers ``save_pretrained`` (single file and sharded) and diffusers ``save_pretrained`` write
the checkpoints; ``loaderkit.load`` must give the same tensors and the same outputs as
``from_pretrained`` with the same dtype.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loaderkit
from loaderkit import StateDictMismatchError

from tiny_configs import TINY_LLAMA as LLAMA
TOKENS = torch.tensor([[1, 5, 9, 3, 7, 11, 2, 60]])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def assert_same_tensors(got: torch.nn.Module, want: torch.nn.Module) -> None:
    """Every state_dict entry equal in dtype and value; the message names the first offender."""
    g, w = got.state_dict(), want.state_dict()
    only_got, only_want = set(g) - set(w), set(w) - set(g)
    assert not (only_got or only_want), f"keys differ: only loaderkit {only_got}, only reference {only_want}"
    for key, ref in w.items():
        assert g[key].dtype == ref.dtype, f"{key}: dtype {g[key].dtype}, reference {ref.dtype}"
        assert torch.equal(g[key], ref), f"{key}: values differ from the reference"


def rewrite_with_extra(path, extra: dict[str, torch.Tensor]) -> None:
    """Rewrite a safetensors file with extra tensors added (as other writers leave them)."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        meta = f.metadata()
    save_file({**tensors, **extra}, str(path), metadata=meta)


# -------------------------------------------------------------------------------------------
# transformers
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def save_llama(transformers, path, tie: bool = True, **save_kwargs):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**LLAMA, tie_word_embeddings=tie)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, **save_kwargs)
    return path


@pytest.fixture(scope="module")
def llama_single(transformers, tmp_path_factory):
    path = save_llama(transformers, tmp_path_factory.mktemp("llama_single"))
    assert (path / "model.safetensors").is_file()
    return path


@pytest.fixture(scope="module")
def llama_sharded(transformers, tmp_path_factory):
    path = save_llama(transformers, tmp_path_factory.mktemp("llama_sharded"), max_shard_size="30KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    return path


@pytest.mark.parametrize("layout", ["llama_single", "llama_sharded"])
@pytest.mark.parametrize("strategy", ["fp32", "bf16"])
def test_llama_matches_from_pretrained(transformers, request, layout, strategy):
    path = request.getfixturevalue(layout)
    dtype = DTYPES[strategy]
    ref = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    model = loaderkit.load(path, strategy=strategy)
    assert type(model) is type(ref) and not model.training
    assert_same_tensors(model, ref)
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, ref(TOKENS).logits)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert model.config._attn_implementation == ref.config._attn_implementation


def test_untied_llama_stays_untied(transformers, tmp_path):
    path = save_llama(transformers, tmp_path, tie=False)
    model = loaderkit.load(path, strategy="bf16")
    ref = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert_same_tensors(model, ref)


@pytest.fixture(scope="module")
def bert_with_position_ids(transformers, tmp_path_factory):
    """A BERT checkpoint that also stores ``embeddings.position_ids`` (as older writers did)."""
    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=64, max_position_embeddings=64,
    )
    transformers.BertModel(cfg).save_pretrained(path)
    rewrite_with_extra(path / "model.safetensors", {"embeddings.position_ids": torch.arange(64)[None]})
    return path


@pytest.mark.parametrize("strategy", ["fp32", "bf16"])
def test_bert_ignores_stored_position_ids(transformers, bert_with_position_ids, strategy):
    path = bert_with_position_ids
    ref = transformers.BertModel.from_pretrained(path, dtype=DTYPES[strategy])
    model = loaderkit.load(path, strategy=strategy, strict=True)
    assert_same_tensors(model, ref)
    mask = torch.ones_like(TOKENS)
    with torch.no_grad():
        assert torch.equal(model(TOKENS, attention_mask=mask).last_hidden_state,
                           ref(TOKENS, attention_mask=mask).last_hidden_state)


def test_truly_unexpected_key_is_still_an_error(transformers, tmp_path):
    path = save_llama(transformers, tmp_path)
    rewrite_with_extra(path / "model.safetensors", {"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    with pytest.raises(StateDictMismatchError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        loaderkit.load(path, strategy="fp32", strict=True)


@pytest.fixture(scope="module")
def t5_checkpoint(transformers, tmp_path_factory):
    """A tiny T5 (``_keep_in_fp32_modules = ["wo"]``) plus a key it lists as ignorable."""
    path = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    cfg = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=64)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(path)
    ignorable = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    rewrite_with_extra(path / "model.safetensors", {ignorable: torch.zeros(32, 4)})
    return path


def test_t5_keeps_wo_fp32_under_fp16(transformers, t5_checkpoint):
    ref = transformers.T5ForConditionalGeneration.from_pretrained(t5_checkpoint, dtype=torch.float16)
    model = loaderkit.load(t5_checkpoint, strategy="fp16")
    wo = [n for n, p in model.named_parameters() if ".wo." in n]
    assert wo and all(dict(model.named_parameters())[n].dtype == torch.float32 for n in wo)
    assert_same_tensors(model, ref)
    assert model.lm_head.weight is model.shared.weight
    dec = torch.tensor([[0, 4, 8]])
    with torch.no_grad():
        got = model(input_ids=TOKENS, decoder_input_ids=dec).logits
        want = ref(input_ids=TOKENS, decoder_input_ids=dec).logits
    assert torch.equal(got, want)


def test_t5_under_bf16_matches_from_pretrained(transformers, t5_checkpoint):
    ref = transformers.T5ForConditionalGeneration.from_pretrained(t5_checkpoint, dtype=torch.bfloat16)
    model = loaderkit.load(t5_checkpoint, strategy="bf16")
    assert_same_tensors(model, ref)


def test_plan_names_the_builder_and_reads_no_data(transformers, llama_single):
    plan = loaderkit.plan(llama_single, strategy="bf16")
    assert isinstance(plan, loaderkit.Plan)
    assert "transformers" in str(plan)


# -------------------------------------------------------------------------------------------
# diffusers
# -------------------------------------------------------------------------------------------


SD3 = dict(
    sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
    pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
)


@pytest.fixture(scope="module")
def sd3_checkpoint(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    path = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    diffusers.SD3Transformer2DModel(**SD3).save_pretrained(path)
    assert (path / "diffusion_pytorch_model.safetensors").is_file()
    return diffusers, path


@pytest.mark.parametrize("strategy", ["fp32", "bf16"])
def test_sd3_matches_from_pretrained(sd3_checkpoint, strategy):
    diffusers, path = sd3_checkpoint
    dtype = DTYPES[strategy]
    ref = diffusers.SD3Transformer2DModel.from_pretrained(path, torch_dtype=dtype)
    model = loaderkit.load(path, strategy=strategy)
    assert type(model) is type(ref) and not model.training
    assert_same_tensors(model, ref)
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 16, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g).to(dtype),
        pooled_projections=torch.randn(1, 16, generator=g).to(dtype),
        timestep=torch.tensor([10]),
    )
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, ref(**inputs).sample)


# -------------------------------------------------------------------------------------------
# model= with a user module
# -------------------------------------------------------------------------------------------


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


@pytest.mark.parametrize("strategy", ["fp32", "bf16"])
@pytest.mark.parametrize("how", ["instance", "class"])
def test_user_module_on_safetensors_file(tmp_path, strategy, how):
    torch.manual_seed(0)
    ref = Net().eval()
    path = tmp_path / "net.safetensors"
    save_file(ref.state_dict(), str(path))
    model = loaderkit.load(path, strategy=strategy, model=Net() if how == "instance" else Net)
    ref = ref.to(DTYPES[strategy])
    assert_same_tensors(model, ref)
    x = torch.randn(3, 8).to(DTYPES[strategy])
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
