//! One trace per migration, checked with an in-memory span exporter: a migration of the simple
//! fixture, run through the library with the in-process agent (reached over gRPC, like a remote
//! one), produces spans that all share the trace id of the caller's root span, a `phase` span
//! per phase, one `table_task` span per table with its documented attributes, and the agent's
//! SERVER spans of the `RunCopy` calls under the coordinator's CLIENT spans of them, under the
//! `table_task` spans (the trace context crossed the gRPC hop).
//!
//! Its own test binary with a single test: it installs the global tracing subscriber.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry::Value;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData, SpanExporter};
use pgzm_agent::telemetry;
use pgzm_coordinator::agents::AgentPool;
use pgzm_coordinator::conninfo::DbUrl;
use pgzm_coordinator::migrate::{self, StartOptions};
use pgzm_coordinator::swap::SwapSettings;
use tokio::sync::watch;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The exported name of the copy call's spans (client and server).
const RUN_COPY: &str = "pgzm.agent.v1.Agent/RunCopy";

/// Longest wait for the last spans to be exported.
const DEADLINE: Duration = Duration::from_secs(10);

/// The in-memory exporter, plus a count of exported spans to wait on (spans of the in-process
/// agent end on its own tasks, a moment after the coordinator has its answer).
#[derive(Debug, Clone)]
struct Notifying {
    inner: InMemorySpanExporter,
    exported: watch::Sender<usize>,
}

impl SpanExporter for Notifying {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.exported.send_modify(|c| *c += n);
        result
    }
}

fn attr(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn attr_str(span: &SpanData, key: &str) -> String {
    attr(span, key)
        .map(|v| v.as_str().into_owned())
        .unwrap_or_else(|| panic!("span {} has no attribute {key}: {span:?}", span.name))
}

fn attr_i64(span: &SpanData, key: &str) -> i64 {
    // Numbers are exported as numbers (backends can then filter and aggregate on them).
    match attr(span, key) {
        Some(Value::I64(n)) => n,
        other => panic!(
            "span {} has no integer attribute {key} ({other:?})",
            span.name
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_is_one_trace_with_phase_table_and_agent_spans() {
    let memory = InMemorySpanExporter::default();
    let (exported, mut exported_rx) = watch::channel(0usize);
    let (layer, provider) = telemetry::layer_with_exporter(
        Notifying {
            inner: memory.clone(),
            exported,
        },
        "pgzm-test",
    );
    // What the binaries export: the project's spans at info, not the libraries' internals.
    tracing_subscriber::registry()
        .with(layer.with_filter(tracing_subscriber::EnvFilter::new(
            "pgzm_coordinator=info,pgzm_agent=info,trace_inmemory=info,warn",
        )))
        .init();

    let (source, dest) = pgzm_tests::fixture_pair("trace", "simple")
        .await
        .expect("load the simple fixture");
    let opts = StartOptions {
        jobs: 2,
        swap: SwapSettings {
            lock_timeout: Duration::from_millis(50),
            total_timeout: Duration::from_secs(10),
            kill_blockers_after: None,
        },
        copy_retries: 1,
        ..StartOptions::new(
            DbUrl::parse(&source.url(), "source").expect("source url"),
            DbUrl::parse(&dest.url(), "destination").expect("dest url"),
        )
    };

    let root = tracing::info_span!("migration_under_test");
    let report = async {
        let pool = AgentPool::in_process(2).await.expect("in-process agent");
        migrate::start(opts, pool).await
    }
    .instrument(root.clone())
    .await
    .expect("migration");
    drop(root);
    let expected_rows: BTreeMap<String, i64> = [("Comment", 2), ("Post", 2), ("User", 2)]
        .into_iter()
        .map(|(t, n)| (t.to_string(), n))
        .collect();
    let reported: BTreeMap<String, i64> = report
        .tables
        .iter()
        .map(|t| (t.table.clone(), t.rows as i64))
        .collect();
    assert_eq!(reported, expected_rows, "the migration itself");

    // Every span has ended once the root has and the agent's three task spans are in.
    let all_in = |spans: &[SpanData]| {
        spans.iter().any(|s| s.name == "migration_under_test")
            && spans
                .iter()
                .filter(|s| s.name == RUN_COPY && s.span_kind == SpanKind::Server)
                .count()
                >= expected_rows.len()
    };
    tokio::time::timeout(DEADLINE, async {
        loop {
            if all_in(&memory.get_finished_spans().expect("spans")) {
                break;
            }
            exported_rx.changed().await.expect("exporter alive");
        }
    })
    .await
    .unwrap_or_else(|_| {
        let names: Vec<String> = memory
            .get_finished_spans()
            .expect("spans")
            .iter()
            .map(|s| s.name.to_string())
            .collect();
        panic!("spans missing after {DEADLINE:?}; have: {names:?}")
    });
    let _ = provider.force_flush();
    let spans = memory.get_finished_spans().expect("spans");
    let by_name =
        |name: &str| -> Vec<&SpanData> { spans.iter().filter(|s| s.name == name).collect() };
    let summary = || {
        spans
            .iter()
            .map(|s| format!("{} {:?}", s.name, s.attributes))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // One trace: the root's.
    let root = by_name("migration_under_test");
    assert_eq!(root.len(), 1);
    let trace: TraceId = root[0].span_context.trace_id();
    assert_eq!(
        root[0].parent_span_id,
        SpanId::INVALID,
        "the root is a root"
    );
    for s in &spans {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "span {} ({:?}) is in another trace; all spans:\n{}",
            s.name,
            s.attributes,
            summary()
        );
    }
    // Every parent is a span of the trace (no dangling parents), and only the root has none.
    let ids: HashSet<SpanId> = spans.iter().map(|s| s.span_context.span_id()).collect();
    for s in &spans {
        if s.name != "migration_under_test" {
            assert!(
                ids.contains(&s.parent_span_id),
                "span {} has a parent outside the trace",
                s.name
            );
        }
    }

    // A span per phase.
    let phases: BTreeSet<String> = by_name("phase")
        .iter()
        .map(|s| attr_str(s, "phase"))
        .collect();
    for phase in ["plan", "shadow", "copy", "constraints", "swap"] {
        assert!(
            phases.contains(phase),
            "no span for phase {phase}: {phases:?}"
        );
    }
    let copy_phase = by_name("phase")
        .into_iter()
        .find(|s| attr_str(s, "phase") == "copy")
        .expect("copy phase span")
        .span_context
        .span_id();

    // One task span per table, with its attributes, under the copy phase.
    let tasks = by_name("table_task");
    let mut task_rows = BTreeMap::new();
    for t in &tasks {
        // The live name, schema-qualified.
        let table = attr_str(t, "table")
            .strip_prefix("public.")
            .unwrap_or_else(|| panic!("unqualified table: {t:?}"))
            .to_string();
        assert!(
            task_rows
                .insert(table.clone(), attr_i64(t, "rows"))
                .is_none(),
            "two task spans for {table}:\n{}",
            summary()
        );
        assert!(attr_i64(t, "bytes") > 0, "bytes of {table}: {t:?}");
        assert_eq!(attr_str(t, "agent"), "in-process", "{t:?}");
        assert_eq!(attr_i64(t, "attempt"), 1, "{t:?}");
        assert!(!attr_str(t, "task").is_empty(), "{t:?}");
        assert!(attr(t, "range").is_some(), "{t:?}");
        assert_eq!(
            t.parent_span_id, copy_phase,
            "{table}: parent is the copy phase"
        );
    }
    assert_eq!(task_rows, expected_rows, "rows per table_task span");

    // The agent's side of each task (a SERVER span) is a child of the coordinator's CLIENT
    // span of the call, itself under the task span.
    let task_ids: HashMap<SpanId, String> = tasks
        .iter()
        .map(|t| (t.span_context.span_id(), attr_str(t, "table")))
        .collect();
    let calls: HashMap<SpanId, String> = by_name(RUN_COPY)
        .into_iter()
        .filter(|s| s.span_kind == SpanKind::Client)
        .map(|c| {
            let table = task_ids.get(&c.parent_span_id).unwrap_or_else(|| {
                panic!("RunCopy client span not under a table_task:\n{}", summary())
            });
            (c.span_context.span_id(), table.clone())
        })
        .collect();
    let agent_tasks: Vec<&SpanData> = by_name(RUN_COPY)
        .into_iter()
        .filter(|s| s.span_kind == SpanKind::Server)
        .collect();
    assert_eq!(agent_tasks.len(), expected_rows.len(), "{}", summary());
    let mut agent_rows = BTreeMap::new();
    for a in &agent_tasks {
        let parent = calls.get(&a.parent_span_id).unwrap_or_else(|| {
            panic!(
                "server span {:?} is not a child of a RunCopy client span:\n{}",
                a.attributes,
                summary()
            )
        });
        assert!(
            a.parent_span_is_remote,
            "the parent came over gRPC metadata"
        );
        // The same table attribute, and the shadow table it fills beside it.
        assert_eq!(&attr_str(a, "table"), parent);
        let shadow = attr_str(a, "shadow");
        let bare = parent.trim_start_matches("public.");
        assert_eq!(shadow, format!("public.shadow_{bare}"));
        agent_rows.insert(bare.to_string(), attr_i64(a, "rows"));
    }
    assert_eq!(agent_rows, expected_rows, "rows per agent_task span");

    // The indexes of each table are built under its own span.
    let builds: BTreeSet<String> = by_name("build_table")
        .iter()
        .map(|s| {
            attr_str(s, "table")
                .trim_start_matches("public.")
                .to_string()
        })
        .collect();
    assert_eq!(
        builds,
        expected_rows.keys().cloned().collect::<BTreeSet<_>>()
    );
    let _ = provider.shutdown();
}
