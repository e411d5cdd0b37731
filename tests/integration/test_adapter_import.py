"""Importing adapters trained elsewhere: checked against the base model, copied in, registered as candidates."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from service.adapters.imports import AdapterImportError, check_against_base
from tests.integration.conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _variant(source, target, *, config=None, weights=None):
    """A copy of the adapter at ``source`` with its config and/or tensors changed."""
    shutil.copytree(source, target)
    if config:
        data = json.loads((target / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps({**data, **config}))
    if weights:
        tensors = load_file(target / "adapter_model.safetensors")
        save_file(weights(tensors), target / "adapter_model.safetensors")
    return target


def _wider(tensors):
    tensors[Q_PROJ_A] = torch.zeros(8, 100)
    return tensors


def _with_lm_head(tensors):
    tensors["base_model.model.lm_head.weight"] = torch.zeros(4, 4)
    return tensors


def _deeper(tensors):
    tensors[Q_PROJ_A.replace("layers.0.", "layers.99.")] = torch.zeros(8, 576)
    return tensors


@pytest.mark.parametrize(("change", "message"), [
    ({"weights": _wider}, "q_proj.lora_A.weight has shape [8, 100]; model.layers.0.self_attn.q_proj takes 576"),
    ({"weights": _deeper}, "the base model has no linear layer model.layers.99.self_attn.q_proj"),
    ({"weights": _with_lm_head}, "lm_head.weight is not a LoRA weight"),
    ({"config": {"r": 4}}, "at rank 4, so it should be"),
    ({"config": {"peft_type": "PREFIX_TUNING"}}, "only LoRA adapters are served"),
    ({"config": {"task_type": "SEQ_CLS"}}, "a chat model needs CAUSAL_LM"),
])
def test_an_adapter_that_does_not_fit_the_base_is_refused_naming_what_differs(default_model, lora_adapters, tmp_path,
                                                                              change, message):
    assert check_against_base(lora_adapters[0], str(default_model))["r"] == 8
    with pytest.raises(AdapterImportError) as refused:
        check_against_base(_variant(lora_adapters[0], tmp_path / "variant", **change), str(default_model))
    assert message in str(refused.value)


def test_operators_import_over_http_and_the_import_is_served(service, lora_adapters, tmp_path):
    def upload(folder, name, headers=ADMIN, files=("adapter_config", "adapter_model")):
        parts = {field: (filename, (folder / filename).read_bytes()) for field, filename in
                 zip(("adapter_config", "adapter_model"), ("adapter_config.json", "adapter_model.safetensors"),
                     strict=True) if field in files}
        return httpx.post(f"{service.url}/api/adapters", files=parts, data={"name": name, "reason": "offline run"},
                          headers=headers, timeout=60)

    imported = upload(lora_adapters[0], "offline-1")
    assert imported.status_code == 201, imported.text
    version = imported.json()["version"]
    assert imported.json()["status"] == "candidate" and imported.json()["path"].endswith(f"/adapters/{version}")
    reply = httpx.post(f"{service.url}/v1/chat/completions", headers=ADMIN, timeout=60, json={
        "model": f"flywheel:v{version}", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["model"] == f"flywheel:v{version}"
    events = httpx.get(f"{service.url}/api/adapters/{version}", headers=ADMIN).json()["events"]
    assert events[0]["to_status"] == "candidate" and events[0]["reason"] == "offline run"

    assert upload(lora_adapters[0], "offline-1").status_code == 409
    user = service.new_key("importer", "user")
    assert upload(lora_adapters[0], "by-a-user", headers={"Authorization": f"Bearer {user}"}).status_code == 403
    missing = upload(lora_adapters[0], "half", files=("adapter_config",))
    assert missing.status_code == 400 and missing.json()["field"] == "adapter_model"
    bad_name = upload(lora_adapters[0], "flywheel:v9")
    assert bad_name.status_code == 400 and bad_name.json()["field"] == "name"
    wider = upload(_variant(lora_adapters[0], tmp_path / "wider", weights=_wider), "wider")
    assert wider.status_code == 400 and wider.json()["field"] == "adapter_model"
    assert "takes 576 inputs" in wider.json()["detail"]
    names = [a["name"] for a in httpx.get(f"{service.url}/api/adapters", headers=ADMIN).json()["data"]]
    assert "wider" not in names and "half" not in names and "by-a-user" not in names


def test_the_cli_imports_and_refuses_a_misfit_in_one_line(service, lora_adapters, tmp_path):
    done = service.cli("adapters", "import", str(lora_adapters[1]), "--name", "cli-import", "--json")
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert row["status"] == "candidate" and row["algorithm"] == "import"
    refused = service.cli("adapters", "import", str(_variant(lora_adapters[1], tmp_path / "r4", config={"r": 4})))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("flywheel: error: ") and "at rank 4" in refused.stderr
