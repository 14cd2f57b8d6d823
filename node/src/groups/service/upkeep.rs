//! Keeping group channels going: catching up from the group mailboxes, held envelopes whose
//! wait ran out, our envelopes not yet in the mailbox, group presence records and connections to
//! members. See `docs/architecture.md`, "Groups".

use super::*;
use crate::messaging::newest_presence_peers;

impl GroupService {
    // ------------------------------------------------------------------------------------
    // Catching up from the group mailbox
    // ------------------------------------------------------------------------------------

    pub(super) async fn collector(
        self: Arc<Self>,
        mut online: watch::Receiver<u64>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut followups = COLLECT_FOLLOWUPS;
        let mut next = tokio::time::Instant::now() + Duration::from_millis(300);
        loop {
            tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                _ = self.collect_kick.notified() => followups = COLLECT_FOLLOWUPS,
                changed = online.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    followups = COLLECT_FOLLOWUPS;
                },
                _ = tokio::time::sleep_until(next) => {},
            }
            match self.collect_all().await {
                Ok(_) => {}
                Err(NodeError::Stopped) => return,
                Err(e) => tracing::debug!(error = %e, "group mailbox collection failed"),
            }
            let wait = if followups > 0 {
                followups -= 1;
                Duration::from_secs(u64::from(COLLECT_FOLLOWUPS - followups))
            } else {
                self.config.collect_interval
            };
            next = tokio::time::Instant::now() + wait;
        }
    }

    /// Read every group mailbox; returns the new messages stored.
    pub(crate) async fn collect_all(self: &Arc<Self>) -> Result<usize, NodeError> {
        let store = self.store.clone();
        let groups = blocking(move || store.groups()).await?;
        let mut new = 0;
        for rec in groups
            .into_iter()
            .filter(|r| r.membership == Membership::Active)
        {
            new += self.collect_group(rec).await?;
        }
        Ok(new)
    }

    pub(super) async fn collect_group(
        self: &Arc<Self>,
        rec: GroupRecord,
    ) -> Result<usize, NodeError> {
        let gid = rec.state.id();
        let started = unix_now();
        let since = rec.last_collect.map_or_else(
            || (rec.joined_at_ms / 1000).saturating_sub(86_400),
            |t| t.saturating_sub(COLLECT_OVERLAP_SECS),
        );
        let oldest = started.saturating_sub(u64::from(meshchat_protocol::group::GROUP_TTL_SECS));
        let first_day = addressing::epoch(since.max(oldest));
        let last_day =
            addressing::epoch(started + meshchat_protocol::envelope::MAX_CLOCK_SKEW_SECS);
        let mut mailboxes = Vec::new();
        for secret in &rec.secrets {
            for day in first_day..=last_day {
                mailboxes.push(group_mailbox(&gid, &secret.secret, day));
            }
        }
        let results: Vec<(bool, Vec<Envelope>)> = futures::stream::iter(mailboxes)
            .map(|keys| async move { self.fetch_mailbox(&keys).await })
            .buffer_unordered(COLLECT_PARALLEL)
            .collect()
            .await;
        let answered = results.iter().any(|(a, _)| *a);
        let mailboxes = results.len();
        let mut all: HashMap<[u8; 32], Envelope> = HashMap::new();
        for (_, envelopes) in results {
            for e in envelopes {
                all.insert(e.id(), e);
            }
        }
        // Skip what was processed, and what is held already (it is retried when the state
        // changes); open the rest in each author's order.
        {
            let held = lock(&self.held);
            for h in held.iter().filter(|h| h.group == gid) {
                all.remove(&h.envelope.id());
            }
        }
        let store = self.store.clone();
        let candidates: Vec<Envelope> = all.into_values().collect();
        let mut fresh = blocking(move || {
            let mut out = Vec::new();
            for e in candidates {
                if store.seen(&gid, &e.id())?.is_none() {
                    out.push(e);
                }
            }
            Ok(out)
        })
        .await?;
        tracing::debug!(
            group = %gid,
            mailboxes,
            answered,
            fresh = fresh.len(),
            "read the group mailboxes"
        );
        fresh.sort_by_key(|e| {
            let (k, i) = group_key_id(e).unwrap_or(([0; 16], 0));
            (e.timestamp, k, i)
        });
        let mut new = 0;
        for e in fresh {
            let (acceptance, _, opened) = self.process(gid, e, Arrival::Mailbox).await;
            if opened != Unblocks::Nothing && matches!(acceptance, MessageAcceptance::Accept) {
                new += 1;
            }
        }
        self.retry_held(gid, Unblocks::All).await;
        if answered {
            let _guard = self.lock.lock().await;
            let store = self.store.clone();
            blocking(move || {
                if let Some(mut rec) = store.group(&gid)? {
                    rec.last_collect = Some(started);
                    let mut batch = Batch::default();
                    batch.put_group(&rec)?;
                    store.commit(batch, None)?;
                }
                Ok(())
            })
            .await?;
        }
        if new > 0 {
            tracing::debug!(group = %gid, new, "caught up from the group mailbox");
        }
        Ok(new)
    }

    /// Every envelope of one group mailbox: from this node's own replica store and from the
    /// closest replicas. Returns (some replica answered, envelopes).
    pub(super) async fn fetch_mailbox(
        &self,
        keys: &meshchat_protocol::MailboxKeys,
    ) -> (bool, Vec<Envelope>) {
        let id = keys.id();
        let now = unix_now();
        let replicas = Arc::clone(&self.replicas);
        let mut out: Vec<Envelope> = tokio::task::spawn_blocking(move || replicas.all(&id, now))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let mut answered = !out.is_empty();
        let wanted = COLLECT_REPLICAS.min(self.mailbox.replicas.max(1));
        let Ok(crate::event_loop::Lookup { peers, .. }) = self
            .net
            .closest_peers(
                id.to_vec(),
                wanted,
                crate::event_loop::LookupPurpose::GroupMailboxCollection,
            )
            .await
        else {
            return (answered, out);
        };
        let fetched = futures::future::join_all(peers.iter().map(|peer| async move {
            let mut got = Vec::new();
            let mut after = None;
            let mut ok = false;
            loop {
                let request = keys.fetch(after, unix_now(), &mut OsRng);
                match self.net.mailbox_request(*peer, request).await {
                    Ok(Ok(MailboxResponse::Envelopes { envelopes, more })) => {
                        ok = true;
                        after = envelopes.last().map(Envelope::id);
                        got.extend(envelopes.into_iter().filter(|e| e.routing_key == id));
                        if !more || after.is_none() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            (ok, got)
        }))
        .await;
        for (ok, got) in fetched {
            answered |= ok;
            out.extend(got);
        }
        (answered, out)
    }

    // ------------------------------------------------------------------------------------
    // Maintenance: held envelopes, mailbox retries, presence, members' connections
    // ------------------------------------------------------------------------------------

    pub(super) async fn maintenance(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_slow: Option<Instant> = None;
        let mut last_prune: Option<Instant> = None;
        let mut last_behind: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                _ = tick.tick() => {}
            }
            self.expire_held().await;
            self.ask_for_keys().await;
            // Still holding ops for the ops before them: the collection that noticed it may
            // have come before those were in the group mailbox (their stores retry with
            // backoff), so ask again now and then rather than wait for the periodic round
            // (in a 200-member formation, 69 members stayed behind for minutes).
            if last_behind.is_none_or(|t| t.elapsed() >= BEHIND_RETRY_EVERY)
                && lock(&self.held)
                    .iter()
                    .any(|h| matches!(h.reason, HoldReason::Ops { .. }))
            {
                last_behind = Some(Instant::now());
                self.note_behind();
            }
            if last_slow.is_some_and(|t| t.elapsed() < SLOW_TICK) {
                continue;
            }
            last_slow = Some(Instant::now());
            let store = self.store.clone();
            let groups = match blocking(move || store.groups()).await {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read groups");
                    continue;
                }
            };
            let active: Vec<GroupRecord> = groups
                .into_iter()
                .filter(|r| r.membership == Membership::Active)
                .collect();
            self.retry_stores().await;
            for rec in &active {
                self.publish_presence(rec).await;
            }
            self.connect_members(&active).await;
            if last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
                last_prune = Some(Instant::now());
                let store = self.store.clone();
                let before = unix_now_ms().saturating_sub(SEEN_RETENTION_MS);
                let r = blocking(move || {
                    let keys = store.stale_seen(before)?;
                    let mut batch = Batch::default();
                    for k in keys {
                        batch.delete(k);
                    }
                    store.commit(batch, None)?;
                    Ok(())
                })
                .await;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "pruning group seen marks failed");
                }
            }
        }
    }

    /// Store held envelopes whose wait for an earlier message ran out (in order), drop those
    /// whose wait for a key ran out.
    pub(super) async fn expire_held(self: &Arc<Self>) {
        let now = Instant::now();
        let groups: HashSet<GroupId> = {
            let mut held = lock(&self.held);
            held.retain(|h| h.reason == HoldReason::Gap || h.until > now);
            held.iter()
                .filter(|h| h.reason == HoldReason::Gap && h.until <= now)
                .map(|h| h.group)
                .collect()
        };
        for gid in groups {
            self.retry_held(gid, Unblocks::All).await;
        }
    }

    /// Put our envelopes that are not yet on enough group-mailbox replicas there.
    pub(super) async fn retry_stores(self: &Arc<Self>) {
        let store = self.store.clone();
        let Ok(pending) = blocking(move || store.pending_stores()).await else {
            return;
        };
        let now_ms = unix_now_ms();
        for (key, p) in pending {
            if p.next_attempt_ms > now_ms || lock(&self.store_in_flight).contains(&key) {
                continue;
            }
            let envelope = match Envelope::from_wire(&p.envelope) {
                Ok(e) if unix_now().saturating_sub(e.timestamp) < PENDING_STORE_MAX_AGE_SECS => e,
                _ => {
                    let store = self.store.clone();
                    let _ = blocking(move || {
                        let mut batch = Batch::default();
                        batch.delete(key);
                        store.commit(batch, None)?;
                        Ok(())
                    })
                    .await;
                    continue;
                }
            };
            lock(&self.store_in_flight).insert(key.clone());
            let result = self.messenger.store_in_mailbox(&envelope).await;
            let store = self.store.clone();
            let storage = self.storage.clone();
            let k = key.clone();
            let changed = blocking(move || {
                let mut batch = Batch::default();
                let mut changed = None;
                match result {
                    Ok(n) => {
                        batch.delete(k);
                        if let Some(id) = p.message_id {
                            changed = storage.set_status(
                                &id,
                                Status::Stored {
                                    replicas: u32::try_from(n).unwrap_or(u32::MAX),
                                },
                            )?;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "group mailbox store retry failed");
                        let attempts = p.attempts.saturating_add(1);
                        let factor = 1u32 << attempts.min(16);
                        let delay = FIRST_STORE_BACKOFF
                            .saturating_mul(factor)
                            .min(MAX_STORE_BACKOFF);
                        batch.put(
                            k,
                            "pending group envelope",
                            &PendingStore {
                                attempts,
                                next_attempt_ms: unix_now_ms().saturating_add(duration_ms(delay)),
                                ..p
                            },
                        )?;
                    }
                }
                store.commit(batch, None)?;
                Ok(changed)
            })
            .await;
            lock(&self.store_in_flight).remove(&key);
            if let Ok(Some(m)) = changed {
                self.emit(NodeEvent::MessageStatus {
                    id: m.id,
                    peer: m.peer,
                    status: m.status,
                });
            }
        }
    }

    pub(super) fn kick_presence(&self, gid: GroupId) {
        lock(&self.published).remove(&gid);
    }

    /// Publish our presence for `rec`'s members if it is due (new day, new secret, new
    /// addresses, or 15 minutes passed).
    pub(super) async fn publish_presence(&self, rec: &GroupRecord) {
        let gid = rec.state.id();
        let Some(secret) = rec.secret().copied() else {
            return;
        };
        let now = unix_now();
        let day = addressing::epoch(now);
        let addrs = self.addrs.borrow().clone();
        if addrs.is_empty() {
            return;
        }
        if let Some((d, s, at, a)) = lock(&self.published).get(&gid) {
            if *d == day && *s == secret && *a == addrs && at.elapsed() < PRESENCE_REPUBLISH {
                return;
            }
        }
        let storage = self.storage.clone();
        let Ok(seq) = blocking(move || Ok(storage.bump_record_seq("group-presence")?)).await else {
            return;
        };
        let presence = Presence {
            peers: vec![PresencePeer {
                peer_id: self.peer_id.to_bytes(),
                addrs: presence_addrs(&addrs),
            }],
        };
        let keys = PresenceKeys::derive(&presence_secret(&gid, &secret), &self.me, day);
        let expires_at = (day + 1)
            .saturating_mul(addressing::EPOCH_SECS)
            .saturating_add(3600);
        let record = match keys.seal(&presence, seq, expires_at, &mut OsRng) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "cannot seal a group presence record");
                return;
            }
        };
        let Ok(value) = record.to_wire() else {
            return;
        };
        match self
            .net
            .put_record(own_record(keys.dht_key(), value, expires_at, now))
            .await
        {
            Ok(Ok(())) => {
                lock(&self.published).insert(gid, (day, secret, Instant::now(), addrs));
            }
            Ok(Err(e)) => {
                tracing::debug!(group = %gid, error = %e, "group presence not published yet")
            }
            Err(_) => {}
        }
    }

    /// Where `member` of `gid` can be reached, from its group presence record (cached).
    pub(super) async fn lookup_member(&self, gid: GroupId, member: PublicIdentity) -> PeerAddrs {
        if let Some((at, peers)) = lock(&self.presence).get(&(gid, member)) {
            if at.elapsed() < PRESENCE_TTL && !peers.is_empty() {
                return peers.clone();
            }
        }
        let store = self.store.clone();
        let Ok(Some(rec)) = blocking(move || store.group(&gid)).await else {
            return Vec::new();
        };
        let now = unix_now();
        let today = addressing::epoch(now);
        // The newest secret first: members move to it when it is handed out.
        for secret in rec.secrets.iter().rev().take(2) {
            let pair = presence_secret(&gid, &secret.secret);
            for day in [today, today.saturating_sub(1)] {
                let keys = PresenceKeys::derive(&pair, &member, day);
                let Ok(found) = self.net.get_record(keys.dht_key()).await else {
                    return Vec::new();
                };
                let peers = newest_presence_peers(&keys, &found, now, self.peer_id);
                if !peers.is_empty() {
                    let mut cache = lock(&self.presence);
                    if cache.len() >= MAX_REMEMBERED_MEMBERS {
                        cache.clear();
                    }
                    cache.insert((gid, member), (Instant::now(), peers.clone()));
                    return peers;
                }
            }
        }
        Vec::new()
    }

    /// Before a 1:1 send to `member`: tell the messenger where it is (members need not be
    /// contacts, so their pair presence may not exist).
    pub(super) async fn note_member_presence(&self, gid: GroupId, member: PublicIdentity) {
        let peers = self.lookup_member(gid, member).await;
        if !peers.is_empty() {
            self.messenger.note_presence(member, peers);
        }
    }

    /// Dial members we are not connected to (all of a small group, a sample of a large one),
    /// so that gossipsub has members to form its mesh with. A group in which we already have
    /// [`MAX_DIAL_MEMBERS`] connected peers subscribed to its topic needs no more (gossipsub's
    /// mesh holds at most 12): without that bound every member of a large group would look up
    /// and dial a dozen more members every round, until it was connected to all of them.
    pub(super) async fn connect_members(self: &Arc<Self>, groups: &[GroupRecord]) {
        if groups.is_empty() {
            return;
        }
        let Ok(status) = self.net.status().await else {
            return;
        };
        let connected: HashSet<PeerId> = status.connected.iter().map(|(p, _)| *p).collect();
        let now = Instant::now();
        for rec in groups {
            let gid = rec.state.id();
            let mut members: Vec<PublicIdentity> = rec
                .state
                .members()
                .map(|(id, _)| *id)
                .filter(|id| *id != self.me)
                .collect();
            let subscribed = match self.net.group_topic_peers(rec.state.topic()).await {
                Ok(peers) => peers.iter().filter(|p| connected.contains(p)).count(),
                Err(_) => return,
            };
            let wanted = MAX_DIAL_MEMBERS.saturating_sub(subscribed);
            if members.len() > MAX_DIAL_MEMBERS && wanted == 0 {
                continue;
            }
            if members.len() > MAX_DIAL_MEMBERS {
                members.shuffle(&mut OsRng);
                members.truncate(wanted);
            }
            for member in members {
                let known = lock(&self.presence)
                    .get(&(gid, member))
                    .map(|(_, p)| p.clone())
                    .unwrap_or_default();
                if known.iter().any(|(p, _)| connected.contains(p)) {
                    lock(&self.dial_backoff).remove(&member);
                    continue;
                }
                let due = lock(&self.dial_backoff)
                    .get(&member)
                    .is_none_or(|(at, _)| *at <= now);
                if !due {
                    continue;
                }
                let me = Arc::clone(self);
                let connected = connected.clone();
                tokio::spawn(async move {
                    let peers = me.lookup_member(gid, member).await;
                    {
                        let mut backoff = lock(&me.dial_backoff);
                        if backoff.len() >= MAX_REMEMBERED_MEMBERS {
                            backoff.clear();
                        }
                        let wait = backoff
                            .get(&member)
                            .map_or(FIRST_DIAL_BACKOFF, |(_, w)| (*w * 2).min(MAX_DIAL_BACKOFF));
                        backoff.insert(member, (Instant::now() + wait, wait));
                    }
                    if peers.is_empty() {
                        return;
                    }
                    me.messenger.note_presence(member, peers.clone());
                    for (peer, addrs) in peers {
                        if connected.contains(&peer) {
                            continue;
                        }
                        for addr in addrs {
                            let addr = if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
                                addr
                            } else {
                                addr.with(Protocol::P2p(peer))
                            };
                            if let Ok(Ok(Ok(()))) =
                                tokio::time::timeout(DIAL_TIMEOUT, me.net.dial(addr)).await
                            {
                                break;
                            }
                        }
                    }
                });
            }
        }
    }
}

/// The addresses a presence record lists: routable before loopback, within the record limits.
fn presence_addrs(addrs: &[Multiaddr]) -> Vec<Vec<u8>> {
    use meshchat_protocol::records::{MAX_ADDRS_PER_PEER, MAX_ADDR_BYTES};
    let is_loopback = |a: &Multiaddr| {
        a.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_loopback(),
            Protocol::Ip6(ip) => ip.is_loopback(),
            _ => false,
        })
    };
    let mut sorted: Vec<&Multiaddr> = addrs.iter().collect();
    sorted.sort_by_key(|a| is_loopback(a));
    sorted
        .into_iter()
        .map(|a| a.to_vec())
        .filter(|b| b.len() <= MAX_ADDR_BYTES)
        .take(MAX_ADDRS_PER_PEER)
        .collect()
}
