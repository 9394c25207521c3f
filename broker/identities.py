"""A secure broker's first start: its identities, their credentials and the command key.

On the first start of a data directory D (no `D/dynamic-security.json` yet)
this writes, in this order: `D/credentials/{admin,controller,operator}` (0700
directories with 0600 `mqtt.json`), the controller's command-signing Ed25519
key pair (`controller/command.key` + `command.pub`, the public half copied to
`admin/command.pub` for provisioning), and last the dynamic-security plugin's
config with those three identities and their roles. Later starts reuse it all:
the plugin keeps its own file up to date as devices are provisioned.

Does file I/O only.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from broker import dynsec
from shared.credentials import (
    COMMAND_KEY_FILE,
    COMMAND_PUB_FILE,
    MQTT_FILE,
    MqttLogin,
    login_json,
    private_dir,
    write_secret,
)
from shared.keys import public_pem, write_atomic

DYNSEC_FILE = "dynamic-security.json"
CREDENTIALS_DIR = "credentials"
# Directory name under D/credentials -> broker username.
IDENTITIES = {
    "admin": dynsec.ADMIN,
    "controller": dynsec.CONTROLLER,
    "operator": dynsec.OPERATOR,
}


def credentials_root(data_dir: Path) -> Path:
    return data_dir / CREDENTIALS_DIR


def ensure_identities(data_dir: Path) -> Path:
    """The plugin's config file under `data_dir`, created with fresh identities if absent."""
    config = data_dir / DYNSEC_FILE
    if config.exists():
        return config
    root = private_dir(credentials_root(data_dir))
    logins: dict[str, MqttLogin] = {}
    for name, username in IDENTITIES.items():
        login = MqttLogin(username, dynsec.new_password())
        write_secret(private_dir(root / name) / MQTT_FILE, login_json(login))
        logins[username] = login
    key = Ed25519PrivateKey.generate()
    controller, admin = root / "controller", root / "admin"
    write_secret(
        controller / COMMAND_KEY_FILE,
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
    )
    public = public_pem(key.public_key())
    write_atomic(controller / COMMAND_PUB_FILE, public)
    write_atomic(admin / COMMAND_PUB_FILE, public)
    # Written last: a start interrupted before this point starts over next time.
    write_secret(config, dynsec.initial_config(logins))
    return config
