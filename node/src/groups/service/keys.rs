//! Sender-key requests: a member that holds envelopes of a chain whose key has not arrived asks
//! the group for it, and the chain's owner hands it out again at once instead of after its
//! retry backoff. See `docs/architecture.md`, "Groups", and `docs/protocol.md`, "Groups".
//!
//! The receiver sees only the chain's 16-byte `key_id` (the author is inside the encryption),
//! so it cannot address the owner; the request is a group message (`GroupBody::KeyRequest`) on
//! its own chain, and only the owner recognises its key id.

use meshchat_protocol::group::MAX_KEY_REQUEST_IDS;
use rand::Rng;

use super::*;

/// The odds of asking for a key that is due again: doubled (at most 1). A key comes due only
/// when nobody's request for it reached us for a round (each one we read defers it), so the
/// longer it stays so, the likelier we are alone in lacking it: a member that alone lacks a
/// writer's key in a 300-member group asked with odds 4/300 every 30 s (~37 minutes on
/// average; the laggard of docs/performance.md, "300 members again"); now it asks within 7
/// rounds (3.5 minutes) at the latest.
fn next_odds(odds: f64) -> f64 {
    (odds * 2.0).min(1.0)
}

impl GroupService {
    /// Called on every maintenance tick: note the sender keys held envelopes wait for, and
    /// consider those missing past their time: each is asked for with the odds of its group
    /// (at most [`MAX_KEY_REQUEST_IDS`] per request, one request per group per
    /// [`KEY_REQUEST_EVERY`]), and considered again after [`KEY_REQUEST_AGAIN`].
    pub(super) async fn ask_for_keys(self: &Arc<Self>) {
        let missing: HashSet<(GroupId, [u8; 16])> = lock(&self.held)
            .iter()
            .filter(|h| h.reason == HoldReason::Key)
            .map(|h| (h.group, h.order.1))
            .collect();
        let new_groups: HashSet<GroupId> = {
            let mut wants = lock(&self.key_wants);
            wants.retain(|k, _| missing.contains(k));
            missing
                .iter()
                .filter(|k| !wants.contains_key(k))
                .map(|(g, _)| *g)
                .collect()
        };
        for gid in new_groups {
            let store = self.store.clone();
            let found = blocking(move || {
                let Some(rec) = store.group(&gid)? else {
                    return Ok(None);
                };
                let own = store.own_chain(&gid)?;
                let current = own.is_some_and(|o| o.epoch >= rec.state.rekey_epoch());
                Ok(Some((rec.state.members().count(), current)))
            })
            .await;
            let Ok(Some((members, current))) = found else {
                continue;
            };
            let after = if current {
                KEY_REQUEST_AFTER
            } else {
                KEY_REQUEST_AFTER_SILENT
            };
            let odds = (KEY_REQUEST_ASKERS / members.max(1) as f64).min(1.0);
            let mut wants = lock(&self.key_wants);
            for key in missing.iter().filter(|(g, _)| *g == gid) {
                wants.entry(*key).or_insert_with(|| {
                    let spread = KEY_REQUEST_SPREAD.mul_f64(rand::thread_rng().gen::<f64>());
                    (Instant::now() + after + spread, odds)
                });
            }
        }
        let now = Instant::now();
        let requests: Vec<(GroupId, Vec<[u8; 16]>)> = {
            let mut wants = lock(&self.key_wants);
            let mut asked = lock(&self.key_asked);
            asked.retain(|_, t| now.duration_since(*t) < KEY_REQUEST_EVERY);
            let mut due: HashMap<GroupId, Vec<[u8; 16]>> = HashMap::new();
            let mut rng = rand::thread_rng();
            for ((gid, key_id), (at, odds)) in wants.iter_mut() {
                if *at > now || asked.contains_key(gid) {
                    continue;
                }
                *at = now + KEY_REQUEST_AGAIN;
                if rng.gen::<f64>() < *odds {
                    due.entry(*gid).or_default().push(*key_id);
                }
                *odds = next_odds(*odds);
            }
            due.into_iter()
                .map(|(gid, mut key_ids)| {
                    key_ids.sort_unstable();
                    key_ids.truncate(MAX_KEY_REQUEST_IDS);
                    asked.insert(gid, now);
                    (gid, key_ids)
                })
                .collect()
        };
        for (gid, key_ids) in requests {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.request_keys(gid, key_ids).await });
        }
    }

    /// Publish a `KeyRequest` for `key_ids` in `gid`, and read our 1:1 mailboxes (a hand-out
    /// stored there for us may simply not have been collected yet).
    async fn request_keys(self: Arc<Self>, gid: GroupId, key_ids: Vec<[u8; 16]>) {
        self.messenger.trigger_collect();
        let asked = key_ids.len();
        let sealed = {
            let _guard = self.lock.lock().await;
            let this = Arc::clone(&self);
            blocking(move || {
                this.seal_blocking(gid, GroupBody::KeyRequest { key_ids }, None)
                    .map(|(s, _)| s)
            })
            .await
        };
        match sealed {
            Ok(sealed) => {
                let (peers, replicas) = self.dispatch(sealed).await;
                tracing::debug!(group = %gid, keys = asked, ?peers, replicas, "asked the group for sender keys");
            }
            Err(e) => tracing::debug!(group = %gid, error = %e, "cannot ask for sender keys"),
        }
    }

    /// `from` asked for `key_ids` in `gid`. Members waiting for the same keys need not ask
    /// again for a while. If one is our current chain, its hand-outs go now: those waiting to
    /// be tried again are woken, what the 1:1 outbox holds for the members is tried again, and
    /// a hand-out to `from` that was never made (we stopped before it reached the outbox) is
    /// made from the chain's current position.
    pub(super) async fn answer_key_request(
        self: &Arc<Self>,
        gid: GroupId,
        from: PublicIdentity,
        key_ids: Vec<[u8; 16]>,
    ) {
        {
            let later = Instant::now() + KEY_REQUEST_AGAIN;
            let mut wants = lock(&self.key_wants);
            for k in &key_ids {
                if let Some((at, _)) = wants.get_mut(&(gid, *k)) {
                    *at = (*at).max(later);
                }
            }
        }
        {
            let mut answered = lock(&self.key_answered);
            if answered
                .get(&(gid, from))
                .is_some_and(|t| t.elapsed() < KEY_ANSWER_EVERY)
            {
                return;
            }
            if answered.len() >= MAX_REMEMBERED_MEMBERS {
                answered.clear();
            }
            answered.insert((gid, from), Instant::now());
        }
        let store = self.store.clone();
        let me = self.me;
        let found = blocking(move || {
            let Some(rec) = store.group(&gid)? else {
                return Ok(None);
            };
            if rec.membership != Membership::Active || !rec.state.is_member(&from) {
                return Ok(None);
            }
            let Some(own) = store.own_chain(&gid)? else {
                return Ok(None);
            };
            let key_id = own.chain.key_id();
            // A chain retired by a removal is never handed out again.
            if own.epoch < rec.state.rekey_epoch() || !key_ids.contains(&key_id) {
                return Ok(None);
            }
            let handed = store.handed(&gid, &from)? == Some(key_id);
            let others: Vec<PublicIdentity> = rec
                .state
                .members()
                .map(|(m, _)| *m)
                .filter(|m| *m != me)
                .collect();
            Ok(Some((
                own.chain.distribution(gid, own.epoch, me),
                handed,
                others,
            )))
        })
        .await;
        let (dist, handed, others) = match found {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up a requested sender key");
                return;
            }
        };
        let key_id = dist.key_id;
        if let Some(wake) = lock(&self.handout_wake).get(&gid) {
            wake.notify_waiters();
        }
        let start = {
            let mut distributing = lock(&self.distributing);
            !handed && distributing.insert((gid, from, key_id))
        };
        tracing::debug!(group = %gid, member = %from.user_id(), handed, new_hand_out = start, "a member asked for our sender key");
        if start {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.hand_out(gid, from, dist).await });
        }
        // The asker speaks for every member lacking the key (most of whom drew not to ask):
        // whatever the outbox holds for the members is tried now.
        self.messenger.wake_outbox(others);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_nobody_else_asks_for_is_asked_for_ever_likelier() {
        let base = (KEY_REQUEST_ASKERS / 300.0).min(1.0);
        let mut odds = base;
        let mut rounds = 0;
        while odds < 1.0 {
            odds = next_odds(odds);
            rounds += 1;
        }
        // 4/300 reaches certainty in 7 rounds of KEY_REQUEST_AGAIN (30 s): 3.5 minutes.
        assert_eq!(rounds, 7);
        assert_eq!(next_odds(1.0), 1.0);
    }
}
