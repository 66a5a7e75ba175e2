"""Actuators: where a decided replica count goes besides the decisions topic.

``KubernetesActuator`` patches the Deployment's ``scale`` subresource (``PATCH
/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`` with a JSON merge patch
``{"spec": {"replicas": n}}``) through the official async client, ``kubernetes_asyncio``. Its
credentials come from the pod's service account when it runs in a cluster
(``KUBERNETES_SERVICE_HOST`` set), else from a kubeconfig (``AUTOSCALER_KUBECONFIG`` or
``~/.kube/config``). The autoscaler's ServiceAccount needs ``get`` and ``patch`` on
``deployments/scale`` in its namespace (deploy/k8s/base/rbac.yaml).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.api_client import ApiClient

log = logging.getLogger("reelbus.autoscaler.actuator")

MERGE_PATCH = "application/merge-patch+json"


class Actuator(Protocol):
    async def scale(self, service: str, replicas: int) -> None: ...

    async def close(self) -> None: ...


class NoActuator:
    """Decisions are only published (``AUTOSCALER_ACTUATOR=none``): ``reelbus autoscale`` or an
    operator acts on them."""

    async def scale(self, service: str, replicas: int) -> None:
        log.info("decided %s -> %d replicas (no actuator configured)", service, replicas)

    async def close(self) -> None:
        return None


class KubernetesActuator:
    def __init__(self, api: ApiClient, namespace: str) -> None:
        self._api = api
        self._apps = client.AppsV1Api(api)
        self.namespace = namespace

    @classmethod
    async def connect(
        cls, namespace: str, kubeconfig: Path | None = None, context: str | None = None
    ) -> KubernetesActuator:
        """In-cluster credentials in a pod, else the kubeconfig."""
        configuration = client.Configuration()
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig else None,
                context=context,
                client_configuration=configuration,
            )
        return cls(ApiClient(configuration), namespace)

    @classmethod
    def at(cls, host: str, namespace: str, token: str | None = None) -> KubernetesActuator:
        """An API server at ``host`` with a bearer token (tests, and a proxied API: ``kubectl proxy``)."""
        configuration = client.Configuration(host=host)
        if token:
            configuration.api_key = {"BearerToken": token}
            configuration.api_key_prefix = {"BearerToken": "Bearer"}
        return cls(ApiClient(configuration), namespace)

    async def replicas(self, deployment: str) -> int:
        scale = await self._apps.read_namespaced_deployment_scale(deployment, self.namespace)
        return int(scale.spec.replicas or 0)

    async def scale(self, service: str, replicas: int) -> None:
        scale = await self._apps.patch_namespaced_deployment_scale(  # type: ignore[call-arg]
            service,
            self.namespace,
            {"spec": {"replicas": replicas}},
            _content_type=MERGE_PATCH,
        )
        log.info(
            "deployment %s/%s scaled to %s (status: %s ready)",
            self.namespace,
            service,
            scale.spec.replicas,
            scale.status.replicas if scale.status else "?",
        )

    async def close(self) -> None:
        await self._api.close()
