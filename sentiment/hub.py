"""Whether the Hugging Face Hub can be reached, asked once per process.

Offline, transformers and huggingface_hub retry each file for most of a minute before they fail, and
before they use a copy from the local cache. When the Hub's name does not resolve (and no proxy is
set, which may resolve it for us), downloads are asked for from the cache alone: a cached model
loads at once, and a missing one is an error at once.
"""

import functools
import os
import socket
import urllib.parse

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@functools.lru_cache(maxsize=None)
def unreachable():
    """The Hub's host name when it does not resolve here; None when it does, or when a proxy is set."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError):
        return host
    return None


def offline(name=None):
    """The Hub's host name when `name` (a Hub id; a local folder never is) would be downloaded from it and
    cannot be; else None."""
    return None if name and os.path.isdir(name) else unreachable()


def download_options(name=None):
    """Keyword arguments for `from_pretrained` and `hf_hub_download`: the local cache alone when offline."""
    return {"local_files_only": True} if offline(name) else {}


def offline_note(name=None):
    """What to add to a failed download's error: why it failed so soon."""
    host = offline(name)
    return f"; {host} does not resolve from this machine, so only its local cache was looked in" if host else ""
