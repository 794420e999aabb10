"""Pushing an export folder to the Hugging Face Hub: create the repository if needed, upload every file."""

from __future__ import annotations

import os
from pathlib import Path

from finetune_kit.errors import ConfigError, ExportError, ModelNotFoundError

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # huggingface_hub honours both
_STATUS_FIXES = {
    401: "the Hub refused the token. Fix: set hf_hub_token to a valid token, or run `hf auth login`",
    403: "the token may not write there. Fix: use a token with write access (a fine-grained token needs write "
    "permission on that namespace), or push to a repository in your own namespace",
    404: "the repository or its namespace was not found. Fix: check the namespace (your user name or an organisation "
    "you belong to) and the endpoint",
}


class HubError(ExportError, ConnectionError):
    """The Hub could not be reached, or refused a request; the message names the repository and the HTTP status.

    Also a ``ConnectionError`` (an ``OSError``), as huggingface_hub's own HTTP errors are.
    """


def push_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None,
    private: bool = False,
    endpoint: str | None = None,
    commit_message: str = "Upload merged model (finetune_kit export)",
) -> str:
    """Upload every file of ``folder`` to the model repository ``repo_id`` (created when missing); returns its URL.

    ``token`` None uses the logged-in one (``hf auth login`` or ``HF_TOKEN``); ``endpoint`` None uses
    ``HF_ENDPOINT`` or huggingface.co. ``private`` applies only when the repository is created. Example::

        url = push_to_hub(exported.export_dir, "me/shop-assistant", token=None)
    """
    path = Path(folder)
    if not path.is_dir():
        raise ModelNotFoundError(f"cannot push {path} to the Hub: it is not a folder. Fix: export first, then push")
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(
            f"export_hub_model_id: got {repo_id!r}, which is not a Hub repository id ({exc}). Fix: 'user/name'"
        ) from None
    offline = [v for v in _OFFLINE_VARIABLES if os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}]
    if offline or constants.is_offline_mode():
        set_by = f"{offline[0]}={os.environ[offline[0]]} is set" if offline else "HF_HUB_OFFLINE was set at start-up"
        raise HubError(
            f"cannot push to the Hub repository {repo_id}: {set_by}, so huggingface_hub makes no network request. "
            f"Fix: unset {offline[0] if offline else 'HF_HUB_OFFLINE'} (in a new process), or push {path} later"
        )
    token = token or get_token()
    if not token:
        raise ConfigError(
            f"pushing to the Hub repository {repo_id} needs a token with write access, and none is set. Fix: set "
            "hf_hub_token (or the HF_TOKEN environment variable), or run `hf auth login`"
        )
    api = HfApi(endpoint=endpoint, token=token)
    where = f"the Hub repository {repo_id} at {api.endpoint}"
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=path, repo_type="model", commit_message=commit_message)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        detail = exc.server_message or str(exc).splitlines()[0]
        fix = _STATUS_FIXES.get(status or 0, "Fix: act on the Hub's reason in parentheses, then push again")
        raise HubError(f"pushing {path} to {where} failed with HTTP {status} ({detail}): {fix}") from exc
    except OfflineModeIsEnabled as exc:  # offline mode switched on after the check above
        raise HubError(f"cannot push to {where}: {exc}") from exc
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        raise HubError(
            f"cannot reach {where} ({type(exc).__name__}: {exc}). Fix: check the network connection, a proxy, or "
            "HF_ENDPOINT"
        ) from exc
    return str(url)


def _is_network_error(exc: BaseException) -> bool:
    """An error of the HTTP stack under huggingface_hub (connection refused, timeout, TLS, ...)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}
