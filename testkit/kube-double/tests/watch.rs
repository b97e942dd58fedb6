//! Watches as kube-runtime's watcher and reflector use them, including the
//! 410 Expired path after compaction, selector transitions and bookmarks.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{NS, api, instance, server};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{reflector, watcher as watch_stream};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

async fn next<S, T>(stream: &mut S) -> T
where
    S: Stream<Item = T> + Unpin,
{
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("an event in time")
        .expect("the stream goes on")
}

fn config_map(name: &str, app: &str) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.to_owned());
    cm.metadata.labels = Some(BTreeMap::from([("app".to_owned(), app.to_owned())]));
    cm
}

fn label(app: &str) -> Patch<serde_json::Value> {
    Patch::Merge(json!({"metadata": {"labels": {"app": app}}}))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watcher_sees_adds_changes_and_deletes() {
    let server = server().await;
    let api = api(&server, "AgentInstance");
    let mut events = watch_stream(api.clone(), watcher::Config::default()).boxed();
    assert!(matches!(next(&mut events).await, Ok(Event::Init)));
    assert!(matches!(next(&mut events).await, Ok(Event::InitDone)));

    api.create(&PostParams::default(), &instance("alice", "coder"))
        .await
        .expect("create");
    match next(&mut events).await {
        Ok(Event::Apply(o)) => assert_eq!(o.data["spec"]["agentType"], "coder"),
        other => panic!("expected the add, got {other:?}"),
    }
    api.patch(
        "alice",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"agentType": "reviewer"}})),
    )
    .await
    .expect("patch");
    match next(&mut events).await {
        Ok(Event::Apply(o)) => assert_eq!(o.data["spec"]["agentType"], "reviewer"),
        other => panic!("expected the change, got {other:?}"),
    }
    api.delete("alice", &DeleteParams::default())
        .await
        .expect("delete");
    match next(&mut events).await {
        Ok(Event::Delete(o)) => assert_eq!(o.name_any(), "alice"),
        other => panic!("expected the delete, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_from_a_compacted_version_gets_410_and_the_watcher_relists() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    // Short watches force re-watches; no bookmarks, so the watcher's
    // resourceVersion stays at its last event.
    let config = watcher::Config::default().timeout(1).disable_bookmarks();
    let mut events = watch_stream(cms.clone(), config).boxed();
    assert!(matches!(next(&mut events).await, Ok(Event::Init)));
    assert!(matches!(next(&mut events).await, Ok(Event::InitDone)));
    cms.create(&PostParams::default(), &config_map("a", "web"))
        .await
        .expect("create");
    assert!(matches!(next(&mut events).await, Ok(Event::Apply(_))));

    // Move the global resourceVersion past the watcher's, then forget history.
    let other = api(&server, "AgentInstance");
    other
        .create(&PostParams::default(), &instance("bump", "x"))
        .await
        .expect("create");
    server.compact();

    match next(&mut events).await {
        Err(watcher::Error::WatchError(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(
                status.message.starts_with("too old resource version: "),
                "{}",
                status.message
            );
        }
        other => panic!("expected 410 Expired, got {other:?}"),
    }
    assert!(matches!(next(&mut events).await, Ok(Event::Init)));
    match next(&mut events).await {
        Ok(Event::InitApply(o)) => assert_eq!(o.name_any(), "a"),
        other => panic!("expected the re-list, got {other:?}"),
    }
    assert!(matches!(next(&mut events).await, Ok(Event::InitDone)));
    let lists = server
        .requests()
        .iter()
        .filter(|r| r.verb == "list" && r.resource == "configmaps")
        .count();
    assert_eq!(lists, 2, "the watcher listed again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_watch_from_a_compacted_version_ends_with_an_error_event() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    let created = cms
        .create(&PostParams::default(), &config_map("a", "web"))
        .await
        .expect("create");
    cms.patch("a", &PatchParams::default(), &label("db"))
        .await
        .expect("patch");
    server.compact();
    let rv = created.resource_version().expect("rv");
    let mut stream = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch starts")
        .boxed();
    match next(&mut stream).await {
        Ok(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    let end = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("ends in time");
    assert!(end.is_none(), "the stream ends after the error");

    // The current version is still watchable and replays nothing.
    let current = cms.list(&ListParams::default()).await.expect("list");
    let rv = current.metadata.resource_version.expect("rv");
    let mut stream = cms
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .expect("watch")
        .boxed();
    cms.patch("a", &PatchParams::default(), &label("web"))
        .await
        .expect("patch");
    assert!(matches!(
        next(&mut stream).await,
        Ok(WatchEvent::Modified(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_replays_history_after_its_resource_version() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    let created = cms
        .create(&PostParams::default(), &config_map("a", "web"))
        .await
        .expect("create");
    cms.patch("a", &PatchParams::default(), &label("db"))
        .await
        .expect("patch");
    cms.delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    let rv = created.resource_version().expect("rv");
    let mut stream = cms
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .expect("watch")
        .boxed();
    assert!(matches!(
        next(&mut stream).await,
        Ok(WatchEvent::Modified(_))
    ));
    assert!(matches!(
        next(&mut stream).await,
        Ok(WatchEvent::Deleted(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn selector_watches_see_objects_enter_and_leave() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    let wp = WatchParams::default().labels("app=web").disable_bookmarks();
    let mut stream = cms.watch(&wp, "0").await.expect("watch").boxed();

    cms.create(&PostParams::default(), &config_map("a", "web"))
        .await
        .expect("create");
    cms.create(&PostParams::default(), &config_map("b", "db"))
        .await
        .expect("create");
    match next(&mut stream).await {
        Ok(WatchEvent::Added(o)) => assert_eq!(o.name_any(), "a"),
        other => panic!("expected a added, got {other:?}"),
    }
    cms.patch("a", &PatchParams::default(), &label("db"))
        .await
        .expect("patch");
    match next(&mut stream).await {
        Ok(WatchEvent::Deleted(o)) => {
            assert_eq!(o.name_any(), "a");
            assert_eq!(o.labels()["app"], "web", "the last matching content");
        }
        other => panic!("expected a to leave, got {other:?}"),
    }
    cms.patch("b", &PatchParams::default(), &label("web"))
        .await
        .expect("patch");
    match next(&mut stream).await {
        Ok(WatchEvent::Added(o)) => assert_eq!(o.name_any(), "b"),
        other => panic!("expected b to enter, got {other:?}"),
    }
    cms.delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    cms.delete("b", &DeleteParams::default())
        .await
        .expect("delete");
    match next(&mut stream).await {
        Ok(WatchEvent::Deleted(o)) => assert_eq!(o.name_any(), "b"),
        other => panic!("expected b deleted, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watches_send_bookmarks_and_end_at_their_timeout() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    let list = cms.list(&ListParams::default()).await.expect("list");
    let rv = list.metadata.resource_version.expect("rv");
    let started = std::time::Instant::now();
    let mut stream = cms
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .expect("watch")
        .boxed();
    match next(&mut stream).await {
        Ok(WatchEvent::Bookmark(b)) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    while let Some(event) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("in time")
    {
        assert!(matches!(event, Ok(WatchEvent::Bookmark(_))), "{event:?}");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_lists_end_with_the_initial_events_bookmark() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    for name in ["a", "b"] {
        cms.create(&PostParams::default(), &config_map(name, "web"))
            .await
            .expect("create");
    }
    let config = watcher::Config::default().streaming_lists();
    let mut events = watch_stream(cms.clone(), config).boxed();
    assert!(matches!(next(&mut events).await, Ok(Event::Init)));
    let mut initial = Vec::new();
    loop {
        match next(&mut events).await {
            Ok(Event::InitApply(o)) => initial.push(o.name_any()),
            Ok(Event::InitDone) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(initial, ["a", "b"]);
    cms.create(&PostParams::default(), &config_map("c", "web"))
        .await
        .expect("create");
    assert!(matches!(next(&mut events).await, Ok(Event::Apply(o)) if o.name_any() == "c"));
    assert!(
        !server.requests().iter().any(|r| r.verb == "list"),
        "a streaming list is a watch"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_watches_and_gets_return_partial_objects() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    cms.create(&PostParams::default(), &config_map("a", "web"))
        .await
        .expect("create");
    let meta = cms.get_metadata("a").await.expect("get metadata");
    assert_eq!(
        meta.metadata.labels.as_ref().map(|l| l["app"].clone()),
        Some("web".to_owned())
    );
    let list = cms
        .list_metadata(&ListParams::default())
        .await
        .expect("list metadata");
    assert_eq!(list.items.len(), 1);

    let metas: Api<PartialObjectMeta<ConfigMap>> = Api::namespaced(server.client(), NS);
    let mut events = watch_stream(metas, watcher::Config::default()).boxed();
    assert!(matches!(next(&mut events).await, Ok(Event::Init)));
    assert!(matches!(next(&mut events).await, Ok(Event::InitApply(o)) if o.name_any() == "a"));
    assert!(matches!(next(&mut events).await, Ok(Event::InitDone)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reflector_store_converges_on_the_server_state() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    for i in 0..5 {
        cms.create(
            &PostParams::default(),
            &config_map(&format!("early-{i}"), "web"),
        )
        .await
        .expect("create");
    }
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = reflector(
        writer,
        watch_stream(cms.clone(), watcher::Config::default()),
    );
    tokio::spawn(stream.try_for_each(|_| async { Ok(()) }));
    reader.wait_until_ready().await.expect("initial list");

    for i in 0..10 {
        cms.create(
            &PostParams::default(),
            &config_map(&format!("late-{i}"), "web"),
        )
        .await
        .expect("create");
    }
    for i in 0..3 {
        cms.patch(&format!("late-{i}"), &PatchParams::default(), &label("db"))
            .await
            .expect("patch");
    }
    for name in ["early-0", "early-1", "late-9", "late-8"] {
        cms.delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }

    let want: BTreeMap<String, String> = server
        .list("", "configmaps", Some(NS))
        .iter()
        .map(|o| {
            (
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                o["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(want.len(), 11);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let have: BTreeMap<String, String> = reader
            .state()
            .iter()
            .map(|o| (o.name_any(), o.resource_version().unwrap_or_default()))
            .collect();
        if have == want {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "store never converged: {have:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
