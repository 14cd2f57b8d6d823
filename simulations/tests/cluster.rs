//! The harness itself: what a scenario counts as running is what runs.

use std::{sync::Arc, time::Duration};

use meshchat_simulations::{
    cluster::{Cluster, ClusterConfig},
    journal::{Journal, NodeChange},
};

/// A departure that comes while the same node is still starting (a churn schedule's return
/// and its next departure, seconds apart on a busy machine) waits for the start, then stops
/// the node: afterwards the node is neither running nor counted as running, the journal's
/// last word on it is its departure, and starting it again works. Before the fix the
/// finishing start marked the stopped node online, and the end of a churn run, which starts
/// every node not counted as running, left it down for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_while_it_starts_ends_up_stopped_and_counted_so() {
    let journal = Arc::new(Journal::new());
    let config = ClusterConfig {
        send_timeout: Duration::from_secs(2),
        minute: Duration::from_secs(3),
        ..ClusterConfig::default()
    };
    let cluster = Arc::new(
        Cluster::new(config, 2, 7, Arc::clone(&journal))
            .await
            .expect("homes"),
    );
    cluster.start(0).await.expect("the first node starts");
    for round in 0..5 {
        let starting = {
            let cluster = Arc::clone(&cluster);
            tokio::spawn(async move { cluster.start(1).await })
        };
        // Opening the home takes milliseconds: the start holds the slot by now.
        tokio::time::sleep(Duration::from_millis(2)).await;
        cluster.stop(1, round % 2 == 0).await;
        starting
            .await
            .expect("the start task")
            .expect("the node starts");
        let running = cluster.handle(1).await.is_some();
        assert_eq!(
            cluster.online(1),
            running,
            "round {round}: counted as running exactly when it runs"
        );
        if !running {
            let last = journal
                .node_changes()
                .into_iter()
                .rev()
                .find(|(_, node, _)| *node == 1)
                .map(|(_, _, change)| change);
            assert!(
                matches!(last, Some(NodeChange::Down | NodeChange::Crashed)),
                "round {round}: the journal ends on the departure: {last:?}"
            );
        }
        cluster.start(1).await.expect("it starts again");
        assert!(cluster.online(1) && cluster.handle(1).await.is_some());
        cluster.stop(1, false).await;
        assert!(!cluster.online(1) && cluster.handle(1).await.is_none());
    }
    cluster.stop_all().await;
}
