"""The server on Ray Serve (extra `[ray]`): several replicas of the model behind one endpoint.

    HTTP -> Ray Serve's proxy -> ChatGLMIngress (the same FastAPI routes as server.py, no model)
         -> ConversationRouter (ray_routing.py: the replica holding the conversation's K/V)
         -> ChatGLMReplica x N (one model each, running an AsyncEngine)

Each replica streams `AsyncEngine.generate`'s events back to the ingress, so the routes, errors and
protocol are server.py's. With `allow_runtime_adapters`, LoRA adapters loaded while serving go to every
replica, and a small `RuntimeAdapters` deployment keeps their list for replicas that start later
(autoscaling, a restart). A replica that dies takes only its in-flight requests with it: those get a
503 (or an error event that ends their stream) within seconds, the router stops sending it work, and
Ray Serve starts a new one.

Three ways in, one configuration (`RaySettings`):
    modelscope-chatglm serve --ray --replicas 2 --model ...       (cli.py -> run())
    serve run modelscope_chatglm.serve.ray_app:app model=... replicas=2
    serve deploy deploy/ray-serve.yaml                           (args under the application)
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import threading
import time
import uuid
from typing import List, Optional, Union

from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError

from .. import openmp
from ..engine.core import NoSuchAdapter
from .async_engine import AdapterFixed, AsyncEngine, ChatCall, QueueFull, ReplicaUnavailable, already_loaded
from .ray_roster import ROSTER
from .ray_routing import ConversationRouter

logger = logging.getLogger(__name__)

APP_NAME = 'chatglm'


@dataclasses.dataclass
class RaySettings:
    """Everything a Ray deployment of the server needs (the `serve run` / config-file arguments)."""
    model: Optional[str] = None        # hub id, directory or configuration; None: the embedded tiny demo
    revision: Optional[str] = None
    device: Optional[str] = None       # default: cuda when the replica has a GPU, else cpu
    dtype: Optional[str] = None
    quantize: Optional[int] = None
    int8_activations: Optional[bool] = None   # None: load()'s default (int8 activations on a quantized CPU model)
    adapter: Union[str, dict, None] = None
    adapter_revision: Optional[str] = None
    no_cuda_graphs: bool = False
    name: Optional[str] = None
    api_key: Optional[List[str]] = None   # the keys (serve/auth.py), each its own prefix-cache scope
    max_body_bytes: int = 1 << 20
    max_queue: int = 100               # per replica
    max_logprobs: int = 20
    allow_unknown_fields: bool = False
    allow_runtime_adapters: bool = False   # /v1/load_lora_adapter and /v1/unload_lora_adapter
    max_batch: Optional[int] = None
    kv_cache_gb: Optional[float] = None
    prefill_chunk: Optional[int] = None
    replicas: int = 1
    autoscale: Optional[str] = None    # 'MIN:MAX' replicas, scaled on ongoing requests
    cpus_per_replica: float = 1
    gpus_per_replica: float = 0

    @classmethod
    def from_args(cls, args: Optional[dict]) -> 'RaySettings':
        """From `serve run` key=value strings or a config file's `args` (typed values)."""
        args = dict(args or {})
        unknown = set(args) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f'unknown settings {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(cls)]}')
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in args:
                continue
            value = args[f.name]
            kind = str(f.type)
            if isinstance(value, str) and f.name != 'adapter' and value.lower() in ('none', 'null', ''):
                value = None
            elif isinstance(value, str) and 'bool' in kind:
                value = value.lower() in ('1', 'true', 'yes')
            elif isinstance(value, str) and ('int' in kind or 'float' in kind):
                value = float(value) if 'float' in kind else int(value)
            values[f.name] = value
        settings = cls(**values)
        settings.autoscale_range()   # validates
        if settings.replicas < 1:
            raise ValueError(f'replicas must be >= 1, got {settings.replicas}')
        return settings

    def autoscale_range(self):
        if not self.autoscale:
            return None
        low, sep, high = str(self.autoscale).partition(':')
        try:
            low, high = int(low), int(high)
        except ValueError:
            low = high = -1
        if not sep or not 0 <= low <= high or high < 1:
            raise ValueError(f'autoscale takes MIN:MAX replicas with 0 <= MIN <= MAX, MAX >= 1; got {self.autoscale!r}')
        return low, high

    def kv_cache_bytes(self) -> Optional[int]:
        return None if self.kv_cache_gb is None else int(self.kv_cache_gb * 2 ** 30)


# -- the model replica ---------------------------------------------------------------------------------------
@serve.deployment
class ChatGLMReplica:
    """One model and its batching engine. Ray Serve runs as many as `replicas` asks."""

    async def __init__(self, settings: RaySettings, runtime_adapters=None):
        import torch
        from ..adapters import parse_specs
        from ..loading import load
        from ..testing.tiny import demo_checkpoint
        if settings.cpus_per_replica >= 1:   # the replica's share of the cores, not all of the machine's
            torch.set_num_threads(int(settings.cpus_per_replica))
        device = settings.device or ('cuda' if settings.gpus_per_replica > 0 else 'cpu')
        adapter = settings.adapter
        if isinstance(adapter, (list, tuple)):   # CLI-style ['NAME=PATH', ...]
            adapter = parse_specs(list(adapter), several=True)
        chat = load(settings.model or demo_checkpoint('glm2'), revision=settings.revision, device=device,
                    dtype=settings.dtype, quantization_bit=settings.quantize,
                    int8_activations=settings.int8_activations, adapter=adapter,
                    adapter_revision=settings.adapter_revision,
                    cuda_graphs=False if settings.no_cuda_graphs else None)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.engine = AsyncEngine(chat, settings.max_queue, settings.max_batch, settings.kv_cache_bytes(),
                             settings.prefill_chunk, replica=self.replica)
        self.runtime_adapters = runtime_adapters
        self._following = asyncio.Lock()   # one change to this replica's adapters at a time
        if runtime_adapters is not None:   # the adapters loaded while serving, before this replica started
            for name, path in (await runtime_adapters.get.remote()).items():
                try:
                    self.engine.load_adapter_sync(name, path)
                except Exception as e:   # (no replica, rather than one refusing what the others serve)
                    raise RuntimeError(f'the adapter {name!r} loaded at run time cannot be loaded from {path} ({e}); '
                                       'restore its files on this node, or unload it (POST /v1/unload_lora_adapter)') \
                        from None
        logger.info('replica %s (pid %d) serves %s', self.replica, os.getpid(), chat)

    def info(self) -> dict:
        e = self.engine
        return {'model_name': e.model_name, 'adapters': e.adapters, 'fixed_adapters': sorted(e.fixed_adapters)}

    async def load_adapter(self, name: str, path: str, replica: Optional[str] = None) -> str:
        """Hold the adapter loaded at run time (RayBackend.load_adapter calls each replica, `replica` pinning
        the call); -> this replica's id. A replica that has it from that path already (it started since, and
        read RuntimeAdapters) keeps it; one that has it from another path (it missed an unload while it
        started) takes the new one."""
        async with self._following:
            try:
                if self.engine.adapter_paths.get(name) != path:
                    if name in self.engine.adapter_paths:
                        await self.engine.unload_adapter(name)
                    await self.engine.load_adapter(name, path)
            except Exception as e:
                raise _portable(e) from None
        return self.replica

    async def unload_adapter(self, name: str, replica: Optional[str] = None) -> str:
        """Drop an adapter loaded at run time, once its requests here have finished; -> this replica's id."""
        async with self._following:
            try:
                if name in self.engine.adapter_paths:
                    await self.engine.unload_adapter(name)
            except Exception as e:
                raise _portable(e) from None
        return self.replica

    async def _catch_up(self, name: str):
        """A request for an adapter this replica does not hold, which RuntimeAdapters has: loaded while this
        replica started, after it read the list and before the HTTP front knew of it. Load it now; if that
        fails, the request is refused as for any adapter the replica does not hold."""
        path = (await self.runtime_adapters.get.remote()).get(name)
        if path is not None:
            try:
                await self.load_adapter(name, path)
            except Exception:
                logger.exception('replica %s could not load the adapter %r from %s', self.replica, name, path)

    async def generate(self, call: ChatCall):
        """AsyncEngine.generate's events; exceptions travel as portable copies."""
        if call.adapter is not None and call.adapter not in self.engine.adapters and self.runtime_adapters is not None:
            await self._catch_up(call.adapter)
        async for kind, value in self.engine.generate(call):
            if kind in ('rejected', 'error'):
                value = _portable(value)
            yield kind, value

    async def tokenize(self, call: ChatCall, special_tokens: bool = True) -> dict:
        try:
            return await self.engine.tokenize(call, special_tokens)
        except Exception as e:   # InputError, ContextLengthError: the caller's, carried as they are
            raise _portable(e) from None

    async def detokenize(self, ids: list) -> dict:
        try:
            return await self.engine.detokenize(ids)
        except Exception as e:
            raise _portable(e) from None

    async def stats(self, replica: Optional[str] = None) -> dict:
        """`replica`: which replica the caller wants (ConversationRouter routes on it)."""
        return dict(self.engine.stats(), pid=os.getpid())

    def check_health(self):
        if not self.engine.engine.stepping_in_background:
            raise RuntimeError('the engine thread stopped')

    def __del__(self):
        engine = getattr(self, 'engine', None)
        if engine is not None:
            engine.cancel_all()


def _portable(exc: Exception) -> Exception:
    """The exception itself if it survives pickling (ours do), else a RuntimeError that says what it was."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f'{type(exc).__name__}: {exc}')


# -- the HTTP front ----------------------------------------------------------------------------------------
class RayBackend:
    """What server.py's routes need of a model, over the replicas' deployment handle."""
    STATS_TIMEOUT_S = 5

    def __init__(self, handle, info: dict, runtime_adapters=None, loaded: Optional[dict] = None):
        self.handle = handle
        self.model_name = info['model_name']
        self.fixed_adapters = list(info.get('fixed_adapters', info['adapters']))
        # What a request's `model` may name: the adapters given at start, and those loaded while serving (the
        # RuntimeAdapters deployment keeps them; this ingress changes them).
        self.adapters = self.fixed_adapters + sorted(set(loaded or {}) - set(self.fixed_adapters))
        self.runtime_adapters = runtime_adapters
        self._adapter_changes = asyncio.Lock()

    async def generate(self, call: ChatCall):
        with _own_routing_id():
            response = self.handle.options(stream=True).generate.remote(call)
        started = False
        try:
            async for kind, value in response:
                started = started or kind == 'start'
                yield kind, value
        except BackPressureError as e:
            yield 'rejected', QueueFull(f'the server is busy ({e}); retry later')
        except RayTaskError as e:   # generate itself failed on the replica: a bug, reported as such
            yield ('error' if started else 'rejected'), RuntimeError(str(e.cause or e))
        except RayError as e:   # the replica died or cannot be reached
            lost = ReplicaUnavailable(f'the replica serving this request stopped ({type(e).__name__}); retry: '
                                      'the other replicas take it')
            yield ('error' if started else 'rejected'), lost
        finally:
            response.cancel()   # the client is gone or the stream ended: the replica drops the sequence

    async def stats_list(self) -> list:
        """One stats dict per running replica, each asked directly (ConversationRouter pins the call).
        One after the other: calls made while serving one HTTP request share its Ray request id, and
        Ray's router would hand one call's replica to the other."""
        ids = list(ROSTER.get((self.handle.app_name, self.handle.deployment_name), ())) or [None]
        seen = {}
        for replica in ids:   # None: before the router's first look at the replicas
            try:
                stats = await asyncio.wait_for(self.handle.stats.remote(replica=replica), self.STATS_TIMEOUT_S)
            except Exception as e:   # gone since the router last looked (or stuck): /health lists the others
                logger.warning('no statistics from replica %s: %r', replica, e)
                continue
            seen[stats['replica']] = stats
        return [seen[k] for k in sorted(seen)]

    async def tokenize(self, call: ChatCall, special_tokens: bool = True) -> dict:
        try:
            return await self.handle.tokenize.remote(call, special_tokens)
        except RayTaskError as e:   # the replica refused it (InputError, ...): the same exception here
            raise e.cause or e

    async def detokenize(self, ids: list) -> dict:
        try:
            return await self.handle.detokenize.remote(ids)
        except RayTaskError as e:
            raise e.cause or e

    def cancel_all(self):
        pass   # each replica cancels its own work when it shuts down

    async def load_adapter(self, name: str, path: str):
        """Every running replica loads it, all at once. RuntimeAdapters has it first, so a replica that starts
        meanwhile or later loads it too. If any replica cannot, none keeps it, and its error is the answer."""
        async with self._adapter_changes:
            if name in self.adapters:
                raise already_loaded(name)
            await self.runtime_adapters.add.remote(name, path)
            try:
                await self._on_every_replica('load_adapter', name, path)
            except BaseException:
                await self.runtime_adapters.remove.remote(name)
                try:
                    await self._on_every_replica('unload_adapter', name)
                except Exception:
                    logger.exception('the adapter %r failed to load; unloading it from the replicas failed too', name)
                raise
            self.adapters = self.adapters + [name]

    async def unload_adapter(self, name: str):
        """New requests for it get a 404 at once; each replica drops it once its requests there have finished."""
        async with self._adapter_changes:
            if name in self.fixed_adapters:
                raise AdapterFixed.named(name)
            if name not in self.adapters:
                raise NoSuchAdapter(f'no adapter named {name!r}; this server holds {self.adapters or "none"}')
            self.adapters = [a for a in self.adapters if a != name]
            await self.runtime_adapters.remove.remote(name)
            await self._on_every_replica('unload_adapter', name)

    async def _on_every_replica(self, method: str, *args):
        """Call `method` on every running replica (as the router last saw them) at once, each call pinned to
        its replica; raise the first failure once all have answered."""
        ids = list(ROSTER.get((self.handle.app_name, self.handle.deployment_name), ())) or [None]

        async def call(replica):
            with _own_routing_id():   # (calls routed at once need ids of their own)
                response = getattr(self.handle, method).remote(*args, replica=replica)
            try:
                return await response
            except RayTaskError as e:   # the replica refused it (CheckpointError, ...): the same exception here
                raise (e.cause or e) from None
            except RayError as e:
                raise ReplicaUnavailable(f'a replica stopped while changing its adapters ({type(e).__name__}); '
                                         'retry') from None
        outcomes = await asyncio.gather(*(call(replica) for replica in ids), return_exceptions=True)
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:
            raise failures[0]


@serve.deployment(ray_actor_options={'num_cpus': 0})
class RuntimeAdapters:
    """The LoRA adapters loaded while serving ({name: path}): RayBackend changes it before it tells the
    replicas, and each model replica loads what it holds when it starts (autoscaling, a restart). It lives as
    long as the application; if this replica itself were restarted, the list would start empty again."""

    def __init__(self):
        self.adapters = {}

    def get(self) -> dict:
        return dict(self.adapters)

    def add(self, name: str, path: str):
        self.adapters[name] = path

    def remove(self, name: str):
        self.adapters.pop(name, None)


@contextlib.contextmanager
def _own_routing_id():
    """Calls made in this block get a routing id of their own.

    Ray Serve files a call that waits for a replica under the internal id of the HTTP request being
    served, which every call made while serving it shares. Two calls routed at once (the choices of a
    request with n > 1) overwrite each other's entry, and one of them never reaches a replica (Ray
    2.60). A call takes the id when it is made, from a context variable: set for the block only."""
    from ray.serve import context
    variable = getattr(context, '_serve_request_context', None)
    if variable is None:   # another Ray: several choices of one request may stall there
        logger.warning('ray.serve.context has no _serve_request_context; requests with n > 1 may stall')
        yield
        return
    token = variable.set(dataclasses.replace(context._get_serve_request_context(),
                                             _internal_request_id=uuid.uuid4().hex))
    try:
        yield
    finally:
        variable.reset(token)


@serve.deployment
@serve.ingress()
class ChatGLMIngress:
    """Ray Serve's HTTP entry: server.py's routes over RayBackend. Holds no model."""

    async def __init__(self, replicas, settings: RaySettings, runtime_adapters=None):
        self.replicas, self.settings, self.runtime_adapters = replicas, settings, runtime_adapters
        self.info = await replicas.info.remote()   # waits until a model replica is up
        # (an ingress that restarts takes the adapters loaded while serving from there)
        self.loaded = await runtime_adapters.get.remote() if runtime_adapters is not None else {}

    async def __serve_build_asgi_app__(self):
        from .server import create_app_over
        s = self.settings
        return create_app_over(RayBackend(self.replicas, self.info, self.runtime_adapters, self.loaded), s.name,
                               s.max_body_bytes, s.api_key, s.max_logprobs, s.allow_unknown_fields,
                               s.allow_runtime_adapters)


def app(args: Optional[dict] = None):
    """The application (a Ray Serve application builder): `serve run modelscope_chatglm.serve.ray_app:app
    model=ZhipuAI/chatglm3-6b replicas=2`, or `import_path` + `args` in a Serve config file."""
    settings = args if isinstance(args, RaySettings) else RaySettings.from_args(args)
    from ..engine.scheduler import DEFAULT_MAX_BATCH
    batch = settings.max_batch or DEFAULT_MAX_BATCH
    per_replica = batch + settings.max_queue   # what one replica takes before its engine says it is busy
    scale = settings.autoscale_range()
    replica_options = dict(
        # A replica's worker process starts with the OpenMP setting of the process that builds the
        # application (openmp.py): this one's, or ours where the user set none.
        ray_actor_options={'num_cpus': settings.cpus_per_replica, 'num_gpus': settings.gpus_per_replica,
                           'runtime_env': {'env_vars': openmp.environment()}},
        max_ongoing_requests=per_replica,
        request_router_config=RequestRouterConfig(request_router_class=ConversationRouter,
                                                  request_router_kwargs={'imbalance': batch}),
        max_constructor_retry_count=3,     # a model that does not load fails the deployment, with its error
        graceful_shutdown_timeout_s=5, health_check_period_s=2, health_check_timeout_s=10)
    if scale:   # scale on requests per replica: a full batch each
        replica_options['autoscaling_config'] = {'min_replicas': scale[0], 'max_replicas': scale[1],
                                                 'initial_replicas': max(scale[0], 1),
                                                 'target_ongoing_requests': batch}
    else:
        replica_options['num_replicas'] = settings.replicas
    # Adapters loaded while serving: their list, for replicas that start later (none without the setting).
    runtime_adapters = RuntimeAdapters.bind() if settings.allow_runtime_adapters else None
    replicas = ChatGLMReplica.options(**replica_options).bind(settings, runtime_adapters)
    most = scale[1] if scale else settings.replicas
    return ChatGLMIngress.options(ray_actor_options={'num_cpus': 0}, max_ongoing_requests=most * per_replica * 2,
                                  ).bind(replicas, settings, runtime_adapters)


def _deployment_errors() -> str:
    """What Ray Serve says went wrong with each deployment: the last line of its replicas' traceback
    (the error itself, e.g. a CheckpointError naming the missing file)."""
    try:
        deployments = serve.status().applications[APP_NAME].deployments
    except Exception:
        return ''
    lines = []
    for name, d in deployments.items():
        last = [line for line in (d.message or '').splitlines() if line.strip()]
        if last:
            lines.append(f'\n  {name}: {last[-1].strip()}')
    return ''.join(lines)


def run(settings: RaySettings, host: str = '127.0.0.1', port: int = 8000):
    """`modelscope-chatglm serve --ray`: join the cluster at RAY_ADDRESS (or start one here), deploy,
    serve until SIGINT/SIGTERM, then take the application down (and the cluster, if started here)."""
    import ray
    address = os.environ.get('RAY_ADDRESS') or None
    ray.init(address=address, include_dashboard=False if address is None else None, log_to_driver=False)
    try:
        serve.start(http_options={'host': host, 'port': port})
        t = time.time()
        try:
            serve.run(app(settings), name=APP_NAME, route_prefix='/', blocking=False)
        except Exception as e:   # a replica that cannot load its model fails the deployment
            raise RuntimeError(f'the Ray Serve deployment failed: {e}{_deployment_errors()}') from None
        scale = settings.autoscale_range()
        print(f'serving on http://{host}:{port} through Ray Serve ({"autoscaling " + settings.autoscale if scale else settings.replicas} '
              f'replicas, ready in {time.time() - t:.1f}s); Ctrl-C stops', flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1):
            pass
    finally:
        try:
            if address is None:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
