"""Models named by Hugging Face hub id (`org/name`, optionally `@revision`), resolved to a Hugging Face cache folder.

A leaf module, and the only place a model is fetched: the network is used only when a user names a hub id, and
offline (`HF_HUB_OFFLINE=1`) a cached model works while an uncached one stops with one line. Weight shards are
fetched when first read, so cutting two layers out of a sharded checkpoint downloads only the shards holding them.
"""

from __future__ import annotations

import re
from pathlib import Path

from elo_cpt.errors import EloError, first_line

#: `org/name` or `org/name@revision`; a path whose first part exists locally is never taken for one.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
#: What a model folder needs besides its weight shards: configs, tokenizer files, the shard index, chat templates.
_METADATA = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "model.safetensors"]


def is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not Path(spec.split("/")[0]).exists() and not Path(spec.split("@")[0]).exists()


def snapshot(spec: str, weights: bool = True) -> Path:
    """The cache folder of hub model `spec`, fetched if needed: its config and tokenizer files, and every weight
    shard when `weights` (otherwise shards come one by one through `fetch`)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    patterns = _METADATA + (["*.safetensors"] if weights else [])
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        why = "the hub is off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise EloError(f"model {spec} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
                       "fetch it once with the network on, or pass a local model folder") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        first = first_line(err)
        raise EloError(f"cannot fetch model {spec} from the Hugging Face hub ({first}); check the id and revision, "
                       "and log in (hf auth login) for gated models") from None


def origin(folder: Path) -> tuple[str, str] | None:
    """(repo id, commit) of a snapshot folder in the Hugging Face cache (`models--ORG--NAME/snapshots/COMMIT`)."""
    parts = Path(folder).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/"), parts[-1]
    return None


def fetch(path: Path) -> None:
    """Download the file `path` of a hub snapshot folder into the cache, if it is missing there."""
    found = origin(path.parent)
    if path.exists() or found is None:
        return
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, commit = found
    try:
        hf_hub_download(repo_id, path.name, revision=commit)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        first = first_line(err)
        raise EloError(f"cannot fetch {path.name} of model {repo_id} from the Hugging Face hub ({first})") from None


def config_folder(spec: str) -> Path:
    """A cache folder holding hub model `spec`'s config.json alone (what `elo plan` reads; no weights, no tokenizer)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision or None)).parent
    except LocalEntryNotFoundError:
        why = "the hub is off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise EloError(f"the config of model {spec} is not in the Hugging Face cache and {why}; fetch it once with the "
                       "network on, or pass a local model folder or a named shape") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise EloError(f"cannot fetch the config of model {spec} from the Hugging Face hub ({first_line(err)}); check "
                       "the id and revision, and log in (hf auth login) for gated models") from None
