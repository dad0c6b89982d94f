"""A secure local stack's security material and Kafka's own admin tools, run as its admin.

:func:`make_secured` makes what a :class:`~pipeline.dev.kafkanode.Secured` node needs (a
throwaway CA, the broker certificate, an admin password and the admin's client properties);
:class:`KafkaTools` runs ``kafka-configs.sh`` (SCRAM users) and ``kafka-acls.sh`` as that admin,
as an operator of a real cluster would (aiokafka has neither the ACL nor the SCRAM admin calls).
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.dev.kafkadist import KafkaDist
from pipeline.dev.kafkanode import Secured
from pipeline.dev.tls import make_ca, make_server_cert
from pipeline.errors import StackError

__all__ = ["ADMIN_PROPERTIES", "KafkaTools", "make_secured"]

ADMIN_PROPERTIES = "admin.properties"
"""The admin's client properties in the security directory (the tools' ``--command-config``)."""


def make_secured(directory: Path) -> Secured:
    """A new CA (``ca.pem``), a broker certificate for the loopback names (``broker.pem``), an
    admin password and :data:`ADMIN_PROPERTIES` (owner-only), all under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory)
    secured = Secured(admin_password=secrets.token_urlsafe(18),
                      keystore=make_server_cert(ca, directory))
    admin = directory / ADMIN_PROPERTIES
    admin.touch(mode=0o600)
    admin.write_text(secured.admin_properties())
    return secured


@dataclass(frozen=True)
class KafkaTools:
    """Kafka's admin tools as the stack's admin, against ``bootstrap`` (a node's own listener)."""

    dist: KafkaDist
    bootstrap: str
    command_config: Path
    log_config: Path
    """A log4j2 config that keeps the tools' INFO lines out of their output."""

    def run(self, main: str, *args: str, timeout_s: float = 60.0) -> str:
        """Run tool class ``main`` with ``args``; its output, or :class:`StackError` with it."""
        argv = [self.dist.java, "-Xmx256m", "-XX:TieredStopAtLevel=1",
                f"-Dlog4j2.configurationFile={self.log_config}", "-cp", self.dist.classpath,
                main, "--bootstrap-server", self.bootstrap,
                "--command-config", str(self.command_config), *args]
        done = subprocess.run(argv, capture_output=True, text=True,  # noqa: S603 - built here
                              timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise StackError(f"{main.rsplit('.', 1)[-1]} {' '.join(args[:2])} failed "
                             f"({done.returncode}): {(done.stderr or done.stdout)[-1500:]}")
        return done.stdout

    def add_scram_user(self, name: str, password: str) -> None:
        """Create (or reset) SCRAM-SHA-512 user ``name`` through the Admin API
        (AlterUserScramCredentials), as ``kafka-configs.sh`` does. The password is on the tool's
        command line, as with ``kafka-configs.sh``: for a local stack's users only."""
        try:
            self.run("org.apache.kafka.tools.ConfigCommand", "--alter", "--add-config",
                     f"SCRAM-SHA-512=[iterations=4096,password={password}]",
                     "--entity-type", "users", "--entity-name", name)
        except StackError as exc:
            raise StackError(str(exc).replace(password, "<redacted>")) from None

    def acls(self, *args: str) -> str:
        """Run ``kafka-acls.sh`` (``AclCommand``) with ``args``."""
        return self.run("org.apache.kafka.tools.AclCommand", *args)
