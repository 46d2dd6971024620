"""The channel and server arguments gRPC knows: the names a config may set.

Data, not code: every string ``#define``d in ``include/grpc/impl/channel_arg_names.h``
of grpcio 1.85.1 (the pinned version; ``include/grpc/impl/grpc_types.h`` includes
that header and defines none of its own), taken from the source distribution
``grpcio-1.85.1.tar.gz`` on PyPI (``pip download --no-binary :all: grpcio==1.85.1``):
the string of each ``#define NAME "grpc...."``, with continued lines joined.

gRPC ignores an argument it does not know, so a misspelt one
(``grpc.keepalive_time_msX``) would be accepted and do nothing; the config
reader refuses names that are not here. Regenerate it when grpcio's pin moves.
"""

from __future__ import annotations

from typing import Final

__all__ = ["GRPC_VERSION", "KNOWN_ARGUMENTS"]

GRPC_VERSION: Final = "1.85.1"

KNOWN_ARGUMENTS: Final = frozenset(
    (
        "grpc.TEST_ONLY_DO_NOT_USE_IN_PROD.xds_bootstrap_config",
        "grpc.absolute_max_metadata_size",
        "grpc.address_http_proxy",
        "grpc.address_http_proxy_enabled_addresses",
        "grpc.authorization_policy_provider",
        "grpc.census",
        "grpc.channel_id",
        "grpc.channel_pooling_domain",
        "grpc.child_channel.args",
        "grpc.client_idle_timeout_ms",
        "grpc.default_authority",
        "grpc.disable_client_authority_filter",
        "grpc.dns_ares_query_timeout",
        "grpc.dns_enable_srv_queries",
        "grpc.dns_min_time_between_resolutions_ms",
        "grpc.dscp",
        "grpc.enable_channelz",
        "grpc.enable_http_proxy",
        "grpc.enable_retries",
        "grpc.event_engine_use_memory_allocator_factory",
        "grpc.expand_wildcard_addrs",
        "grpc.experimental.enable_hedging",
        "grpc.experimental.event_engine",
        "grpc.experimental.grpclb_channel_args",
        "grpc.experimental.http2.enable_preferred_frame_size",
        "grpc.experimental.server_config_change_drain_grace_time_ms",
        "grpc.experimental.stats_plugins",
        "grpc.experimental.tcp_max_read_buffer_size",
        "grpc.experimental.tcp_max_read_chunk_size",
        "grpc.experimental.tcp_min_read_chunk_size",
        "grpc.experimental.tcp_read_chunk_size",
        "grpc.experimental.tcp_trace_full_buffer",
        "grpc.experimental.tcp_tx_zerocopy_enabled",
        "grpc.experimental.tcp_tx_zerocopy_max_simultaneous_sends",
        "grpc.experimental.tcp_tx_zerocopy_send_bytes_threshold",
        "grpc.grpclb_call_timeout_ms",
        "grpc.grpclb_fallback_timeout_ms",
        "grpc.happy_eyeballs_connection_attempt_delay_ms",
        "grpc.http2.bdp_probe",
        "grpc.http2.hpack_table_size.decoder",
        "grpc.http2.hpack_table_size.encoder",
        "grpc.http2.initial_sequence_number",
        "grpc.http2.lookahead_bytes",
        "grpc.http2.max_frame_size",
        "grpc.http2.max_ping_strikes",
        "grpc.http2.max_pings_without_data",
        "grpc.http2.max_security_frame_size",
        "grpc.http2.min_ping_interval_without_data_ms",
        "grpc.http2.min_time_between_pings_ms",
        "grpc.http2.true_binary",
        "grpc.http2.write_buffer_size",
        "grpc.http2_scheme",
        "grpc.http_proxy",
        "grpc.inhibit_health_checking",
        "grpc.initial_reconnect_backoff_ms",
        "grpc.keepalive_permit_without_calls",
        "grpc.keepalive_time_ms",
        "grpc.keepalive_timeout_ms",
        "grpc.lb.ring_hash.ring_size_cap",
        "grpc.lb_policy_name",
        "grpc.loadreporting",
        "grpc.max_allowed_incoming_connections",
        "grpc.max_channel_trace_event_memory_per_node",
        "grpc.max_concurrent_streams",
        "grpc.max_connection_age_grace_ms",
        "grpc.max_connection_age_ms",
        "grpc.max_connection_idle_ms",
        "grpc.max_connections_per_subchannel_cap",
        "grpc.max_metadata_size",
        "grpc.max_receive_message_length",
        "grpc.max_reconnect_backoff_ms",
        "grpc.max_send_message_length",
        "grpc.min_reconnect_backoff_ms",
        "grpc.minimal_stack",
        "grpc.mobile_log_context",
        "grpc.optimization_target",
        "grpc.per_message_compression",
        "grpc.per_message_decompression",
        "grpc.per_rpc_retry_buffer_size",
        "grpc.primary_user_agent",
        "grpc.priority_failover_timeout_ms",
        "grpc.resource_quota",
        "grpc.secondary_user_agent",
        "grpc.security_frame_allowed",
        "grpc.server.max_pending_requests",
        "grpc.server.max_pending_requests_hard_limit",
        "grpc.server_call_metric_recording",
        "grpc.server_config_fetcher",
        "grpc.server_handshake_timeout_ms",
        "grpc.server_max_unrequested_time_in_server",
        "grpc.service_config",
        "grpc.service_config_disable_resolution",
        "grpc.so_reuseport",
        "grpc.socket_factory",
        "grpc.socket_mutator",
        "grpc.ssl_session_cache",
        "grpc.ssl_target_name_override",
        "grpc.surface_user_agent",
        "grpc.tcp_receive_buffer_size",
        "grpc.tcp_tracing_enabled",
        "grpc.tsi.max_frame_size",
        "grpc.use_local_subchannel_pool",
    )
)
