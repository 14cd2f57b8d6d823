//! Receiving group messages: validation of gossipsub messages, opening and committing
//! envelopes, held envelopes, membership ops and their consequences, and the control inbox of
//! group messages that came over 1:1. See `docs/architecture.md`, "Groups".

use super::*;

impl GroupService {
    // ------------------------------------------------------------------------------------
    // Receiving
    // ------------------------------------------------------------------------------------

    /// Fold `op` into `rec` and work out what that means for us.
    pub(super) fn apply_op(
        &self,
        rec: &mut GroupRecord,
        op: &MembershipOp,
    ) -> Result<Effects, GroupError> {
        let was_member = rec.state.is_member(&self.me);
        let rekey_before = rec.state.rekey_epoch();
        let applied = rec.state.apply(op)?;
        let mut effects = Effects {
            changed: !matches!(applied, meshchat_protocol::Applied::Duplicate),
            ..Effects::default()
        };
        let mut lost_leaves = Vec::new();
        let mut sort_out = |o: MembershipOp, effects: &mut Effects| {
            if *o.author() == self.me {
                effects.reissue.push(o);
            } else if matches!(o.change(), MembershipChange::Leave) {
                lost_leaves.push(*o.author());
            }
        };
        match applied {
            meshchat_protocol::Applied::ReplacedHead { dropped } => {
                for o in dropped {
                    sort_out(o, &mut effects);
                }
            }
            meshchat_protocol::Applied::Lost => sort_out(op.clone(), &mut effects),
            _ => {}
        }
        let first_admin = rec
            .state
            .members()
            .find(|(_, role)| *role == Role::Admin)
            .map(|(id, _)| *id);
        if first_admin == Some(self.me) {
            effects.complete_leave = lost_leaves
                .into_iter()
                .filter(|who| rec.state.is_member(who))
                .collect();
        }
        if was_member && !rec.state.is_member(&self.me) {
            rec.membership =
                if *op.author() == self.me && matches!(op.change(), MembershipChange::Leave) {
                    Membership::Left
                } else {
                    Membership::Removed
                };
            effects.left = true;
        }
        let rekey = rec.state.rekey_epoch();
        if rekey > rekey_before && rec.state.is_member(&self.me) {
            // Someone left: the first admin gives the mailbox a new secret (a remover does it
            // for its own removal).
            let departure_is_leave = rec
                .state
                .recent_ops()
                .find(|o| o.seq() == rekey)
                .is_some_and(|o| matches!(o.change(), MembershipChange::Leave));
            if departure_is_leave && first_admin == Some(self.me) {
                effects.rekey = true;
            }
            let by_me = rec
                .state
                .recent_ops()
                .find(|o| o.seq() == rekey)
                .is_some_and(|o| {
                    *o.author() == self.me && matches!(o.change(), MembershipChange::Remove { .. })
                });
            if by_me || effects.rekey {
                let mut secret = [0u8; 32];
                OsRng.fill_bytes(&mut secret);
                rec.add_secret(rekey, secret);
                effects.rekey = true;
            }
        }
        Ok(effects)
    }

    /// Try to open one envelope of `gid` and commit what it carries. A gossipsub message
    /// (`origin`) is accepted — forwarded by gossipsub — as soon as it authenticated, before
    /// the commit, so that the durable write of each member is not on the path of every hop.
    /// Call under `lock`, on a blocking thread.
    pub(super) fn open_blocking(
        &self,
        gid: GroupId,
        env: &Envelope,
        arrival: Arrival,
        now: u64,
        origin: Option<&GossipOrigin>,
    ) -> Result<Opened, NodeError> {
        let Some(mut rec) = self.store.group(&gid)? else {
            return Ok(Opened::NotOurs);
        };
        if rec.membership != Membership::Active {
            return Ok(Opened::NotOurs);
        }
        let envelope_id = env.id();
        if let Some(seen) = self.store.seen(&gid, &envelope_id)? {
            if arrival == Arrival::Gossip && seen.via == Via::Other {
                // The one gossip copy a message we had from the group mailbox may still get
                // (its author kept it until a member subscribed): ignored, but from now on a
                // copy over gossipsub is a replay.
                let mut batch = Batch::default();
                batch.put(
                    store::seen_key(&gid, &envelope_id),
                    "seen envelope",
                    &SeenEnvelope {
                        via: Via::Gossip,
                        at_ms: seen.at_ms,
                    },
                )?;
                self.store.commit(batch, None)?;
                return Ok(Opened::Duplicate);
            }
            return Ok(if arrival == Arrival::Gossip && seen.via == Via::Gossip {
                Opened::Replay
            } else {
                Opened::Duplicate
            });
        }
        let (key_id, iteration) = match check_group_envelope(env, now) {
            Ok(k) => k,
            Err(e) => return Ok(classify(e)),
        };
        let Some(mut chain) = self.store.receiver_chain(&gid, &key_id)? else {
            return Ok(Opened::Hold {
                reason: HoldReason::Key,
                verified: false,
            });
        };
        if iteration < chain.first_iteration() {
            // Sealed before the author handed us its chain (before we joined, typically the
            // ops that added earlier members): unreadable to us by design, and no replay —
            // whoever relays it (gossip history, the group mailbox) is blameless. Marked seen
            // so that the mailbox collection does not fetch it again.
            let mut batch = Batch::default();
            batch.put(
                store::seen_key(&gid, &envelope_id),
                "seen envelope",
                &SeenEnvelope {
                    via: Via::Other,
                    at_ms: unix_now_ms(),
                },
            )?;
            self.store.commit(batch, None)?;
            return Ok(Opened::Drop(GroupError::Replay { iteration }));
        }
        let next = chain.next_iteration();
        let plaintext = match open_group(&rec.state, &mut chain, env, now) {
            Ok(p) => p,
            Err(GroupError::UnknownSenderKey { .. }) => {
                return Ok(Opened::Hold {
                    reason: HoldReason::Key,
                    verified: false,
                })
            }
            Err(GroupError::FutureEpoch { .. }) => {
                self.note_behind();
                return Ok(Opened::Hold {
                    reason: HoldReason::Epoch,
                    verified: false,
                });
            }
            Err(e) => return Ok(classify(e)),
        };
        if iteration > next && iteration - next <= MAX_GAP_WAIT && arrival.gap_ok(Instant::now()) {
            // Authentic, but an earlier message of this chain is missing: wait a moment for it
            // so the author's order is kept (nothing committed yet).
            return Ok(Opened::Hold {
                reason: HoldReason::Gap,
                verified: true,
            });
        }
        // An op is folded in before anything is reported or committed: one that lies beyond
        // the ops we have (we joined from an older snapshot, or missed some) is held, not
        // consumed. Marking it seen would make the group mailbox collection skip it for good,
        // and every op after it would wait for it forever.
        let now_ms = unix_now_ms();
        let mut effects = Effects::default();
        let mut state_changed = false;
        let message = match plaintext.body {
            GroupBody::Text(body) if plaintext.author != self.me => Some(StoredMessage {
                id: plaintext.id.0,
                peer: plaintext.author,
                direction: Direction::In,
                seq: u64::from(iteration) + 1,
                sent_at_ms: plaintext.sent_at_ms,
                received_at_ms: now_ms,
                body,
                status: Status::Delivered,
                group: Some(gid.0),
            }),
            GroupBody::Text(_) => None,
            GroupBody::KeyRequest { key_ids } => {
                if plaintext.author != self.me {
                    effects.key_request = Some(Box::new((plaintext.author, key_ids)));
                }
                None
            }
            GroupBody::Op(op) => {
                match self.apply_op(&mut rec, &op) {
                    Ok(e) => {
                        state_changed = e.changed || e.left || e.rekey;
                        effects = e;
                    }
                    Err(GroupError::Gap { have, got }) => {
                        // Authentic (forwarded), but not applicable yet: the ops between are
                        // in the group mailbox.
                        tracing::debug!(group = %gid, have, got, "membership op ahead of ours held");
                        self.note_behind();
                        return Ok(Opened::Hold {
                            reason: HoldReason::Ops {
                                ready_at: got.saturating_sub(
                                    meshchat_protocol::group::MAX_PENDING_OPS as u64,
                                ),
                            },
                            verified: true,
                        });
                    }
                    Err(e) => {
                        // The message is authentic; the op inside is refused (a member
                        // breaking the rules): drop the op, nobody relayed anything wrong.
                        tracing::debug!(group = %gid, author = %plaintext.author.user_id(), error = %e, "membership op refused");
                    }
                }
                None
            }
        };
        let reported = match origin {
            Some((id, source)) => self
                .net
                .group_report_blocking(id.clone(), *source, MessageAcceptance::Accept, "")
                .is_ok(),
            None => false,
        };
        let mut batch = Batch::default();
        batch.put(store::receiver_key(&gid, &key_id), "receiver chain", &chain)?;
        batch.put(
            store::seen_key(&gid, &envelope_id),
            "seen envelope",
            &SeenEnvelope {
                via: arrival.via(),
                at_ms: now_ms,
            },
        )?;
        if state_changed {
            batch.put_group(&rec)?;
        }
        let index = self.store.commit(batch, message.as_ref())?;
        Ok(Opened::Stored {
            message: index.and(message).map(Box::new),
            effects,
            reported,
            unblocks: if state_changed {
                Unblocks::All
            } else {
                Unblocks::Chain(key_id)
            },
        })
    }

    /// Process one envelope: open, commit, hold or refuse; act on the result. Returns the
    /// gossipsub verdict and which held envelopes may open now.
    pub(super) async fn process(
        self: &Arc<Self>,
        gid: GroupId,
        envelope: Envelope,
        arrival: Arrival,
    ) -> (MessageAcceptance, &'static str, Unblocks) {
        let (acceptance, reason, unblocks, _) =
            self.process_from(gid, envelope, arrival, None).await;
        (acceptance, reason, unblocks)
    }

    /// [`Self::process`] for a gossipsub message from `origin`; the last value says whether
    /// its verdict was reported already (Accept, as soon as it authenticated).
    pub(super) async fn process_from(
        self: &Arc<Self>,
        gid: GroupId,
        envelope: Envelope,
        arrival: Arrival,
        origin: Option<GossipOrigin>,
    ) -> (MessageAcceptance, &'static str, Unblocks, bool) {
        let started = Instant::now();
        let (opened, waited) = {
            let _guard = self.lock.lock().await;
            let waited = started.elapsed();
            let this = Arc::clone(self);
            let env = envelope.clone();
            let opened = blocking(move || {
                this.open_blocking(gid, &env, arrival, unix_now(), origin.as_ref())
            })
            .await;
            (opened, waited)
        };
        if let Ok(o) = &opened {
            tracing::debug!(
                group = %gid,
                arrival = ?arrival,
                outcome = o.label(),
                waited_ms = waited.as_millis() as u64,
                took_ms = started.elapsed().as_millis() as u64,
                "group envelope processed"
            );
        }
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(group = %gid, error = %e, "cannot process a group envelope");
                return (
                    MessageAcceptance::Ignore,
                    "internal error",
                    Unblocks::Nothing,
                    false,
                );
            }
        };
        let (acceptance, reason, unblocks) = match opened {
            Opened::Stored {
                message,
                effects,
                reported,
                unblocks,
            } => {
                if let Some(m) = message {
                    self.emit(NodeEvent::MessageReceived(*m));
                }
                self.act_on(gid, effects).await;
                return (MessageAcceptance::Accept, "", unblocks, reported);
            }
            Opened::Hold { reason, verified } => {
                // How it first came decides whether a later gossip copy is a replay: an honest
                // peer never sends a message over gossipsub twice after the duplicate window,
                // but one we first read from the mailbox may still be published to us once.
                let first = arrival.via();
                // Held again for the same reason: the same deadline.
                let until = match arrival {
                    Arrival::Held {
                        reason: was, until, ..
                    } if was == reason => Some(until),
                    _ => None,
                };
                self.hold(gid, envelope, first, reason, until);
                if verified {
                    (MessageAcceptance::Accept, "", Unblocks::Nothing)
                } else {
                    (MessageAcceptance::Ignore, "", Unblocks::Nothing)
                }
            }
            Opened::Duplicate | Opened::NotOurs => {
                (MessageAcceptance::Ignore, "", Unblocks::Nothing)
            }
            Opened::Replay => (
                MessageAcceptance::Reject,
                "replayed group message",
                Unblocks::Nothing,
            ),
            Opened::Drop(e) => {
                tracing::debug!(group = %gid, error = %e, "group envelope dropped");
                (MessageAcceptance::Ignore, "", Unblocks::Nothing)
            }
            Opened::Bad(e) => {
                tracing::debug!(group = %gid, error = %e, "bad group envelope");
                if arrival == Arrival::Mailbox {
                    // Do not look at it again in the next collection.
                    self.mark_seen(gid, &envelope).await;
                }
                (MessageAcceptance::Reject, reason_of(&e), Unblocks::Nothing)
            }
        };
        (acceptance, reason, unblocks, false)
    }

    pub(super) async fn mark_seen(&self, gid: GroupId, envelope: &Envelope) {
        let store = self.store.clone();
        let id = envelope.id();
        let _ = blocking(move || {
            let mut batch = Batch::default();
            batch.put(
                store::seen_key(&gid, &id),
                "seen envelope",
                &SeenEnvelope {
                    via: Via::Other,
                    at_ms: unix_now_ms(),
                },
            )?;
            store.commit(batch, None)?;
            Ok(())
        })
        .await;
    }

    pub(super) fn hold(
        &self,
        group: GroupId,
        envelope: Envelope,
        first: Via,
        reason: HoldReason,
        until: Option<Instant>,
    ) {
        let Ok((key_id, iteration)) = group_key_id(&envelope) else {
            return;
        };
        let id = envelope.id();
        let mut held = lock(&self.held);
        if held.iter().any(|h| h.group == group && h.id == id) {
            return;
        }
        if held.iter().filter(|h| h.group == group).count() >= MAX_HELD_PER_GROUP
            || held.len() >= MAX_HELD
        {
            // The oldest goes; the group mailbox still has it.
            if let Some(i) = held.iter().position(|h| h.group == group) {
                held.remove(i);
            } else {
                held.remove(0);
            }
        }
        let wait = if reason == HoldReason::Gap {
            HOLD_FOR_GAP
        } else {
            HOLD_FOR_KEY
        };
        held.push(Held {
            group,
            id,
            order: (envelope.timestamp, key_id, iteration),
            envelope,
            first,
            reason,
            until: until.unwrap_or_else(|| Instant::now() + wait),
        });
    }

    /// Retry what is held for `gid` that `unblocks` may let open, in chain order, until
    /// nothing more opens. A stored text only lets the next messages of its own chain open:
    /// retrying every held envelope after each message cost each member of a 100-member group
    /// a decryption attempt per message for an envelope whose key never came.
    pub(super) async fn retry_held(self: &Arc<Self>, gid: GroupId, unblocks: Unblocks) {
        // One retry at a time, so held envelopes are taken in chain order.
        let _retrying = self.retry_lock.lock().await;
        let mut unblocks = unblocks;
        for _ in 0..8 {
            let batch: Vec<Held> = {
                let mut held = lock(&self.held);
                let (mine, rest): (Vec<Held>, Vec<Held>) = held
                    .drain(..)
                    .partition(|h| h.group == gid && unblocks.may_open(h.reason, &h.order.1));
                *held = rest;
                mine
            };
            if batch.is_empty() {
                return;
            }
            // An op held for the ops before it waits, untouched, until our head is near enough
            // (retrying it on every change cost a member far behind a quadratic number of
            // decryptions: 238,598 retries in one 200-member formation).
            let store = self.store.clone();
            let epoch = blocking(move || store.group(&gid))
                .await
                .ok()
                .flatten()
                .map_or(0, |r| r.state.epoch());
            let (waiting, ready): (Vec<Held>, Vec<Held>) = batch.into_iter().partition(
                |h| matches!(h.reason, HoldReason::Ops { ready_at } if epoch < ready_at),
            );
            lock(&self.held).extend(waiting);
            let mut batch = ready;
            if batch.is_empty() {
                return;
            }
            batch.sort_by_key(|h| h.order);
            let now = Instant::now();
            let mut progress = false;
            for h in batch {
                if h.until <= now && h.reason != HoldReason::Gap {
                    continue;
                }
                let arrival = Arrival::Held {
                    first: h.first,
                    reason: h.reason,
                    until: h.until,
                };
                let (_, _, opened) = self.process(gid, h.envelope, arrival).await;
                if opened != Unblocks::Nothing {
                    // What opened may let more open: a text its chain's next messages, an op
                    // anything.
                    progress = true;
                    unblocks = unblocks.and(opened);
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// Act on what an op changed: leave the topic, hand out a new mailbox secret, re-issue our
    /// dropped ops, retry what waits for the state.
    pub(super) async fn act_on(self: &Arc<Self>, gid: GroupId, effects: Effects) {
        let mut effects = effects;
        if let Some(request) = effects.key_request.take() {
            let (from, key_ids) = *request;
            self.answer_key_request(gid, from, key_ids).await;
        }
        let reissue = std::mem::take(&mut effects.reissue);
        let complete = std::mem::take(&mut effects.complete_leave);
        self.act_on_state(gid, &effects).await;
        let changes = reissue.into_iter().map(|op| op.change().clone()).chain(
            complete
                .into_iter()
                .map(|member| MembershipChange::Remove { member }),
        );
        for change in changes {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.reissue(gid, change).await });
        }
    }

    pub(super) async fn act_on_state(self: &Arc<Self>, gid: GroupId, effects: &Effects) {
        if effects.left {
            let store = self.store.clone();
            if let Ok(Some(rec)) = blocking(move || store.group(&gid)).await {
                self.unsubscribe(&gid, rec.state.topic()).await;
            }
            lock(&self.held).retain(|h| h.group != gid);
            tracing::info!(group = %gid, "no longer a member of a group");
        }
        if effects.rekey {
            let store = self.store.clone();
            if let Ok(Some(rec)) = blocking(move || store.group(&gid)).await {
                self.send_rekey(&rec).await;
            }
        }
        if effects.changed {
            self.kick.notify_one();
        }
    }

    /// Make `change` again on the new head (an op of ours lost a tie against a concurrent one).
    pub(super) async fn reissue(self: Arc<Self>, gid: GroupId, change: MembershipChange) {
        let add = match &change {
            MembershipChange::Add { member, .. } => Some(*member),
            _ => None,
        };
        match self.change_membership(gid, change).await {
            Ok((sealed, rec, effects)) => {
                self.dispatch(sealed).await;
                if !effects.reissue.is_empty() {
                    tracing::debug!(group = %gid, "a re-issued op lost again; not retried");
                }
                self.act_on_state(gid, &effects).await;
                if let (Some(member), Some(secret)) = (add, rec.secret()) {
                    // The invite named the dropped op's head: send a fresh one.
                    match GroupInvite::new(
                        &rec.state,
                        &self.identity,
                        &member,
                        secret,
                        unix_now_ms(),
                    ) {
                        Ok(invite) => {
                            if let Err(e) = self
                                .messenger
                                .send_control(member, GroupControl::Invite(invite))
                                .await
                            {
                                tracing::debug!(error = %e, "fresh invite not sent");
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "no fresh invite"),
                    }
                }
            }
            Err(e) => tracing::debug!(group = %gid, error = %e, "a dropped op is not re-issued"),
        }
    }

    pub(super) async fn gossip_worker(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<GossipInbound>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let item = tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                item = rx.recv() => match item {
                    Some(item) => item,
                    None => return,
                },
            };
            let GossipInbound {
                source,
                id,
                topic,
                data,
            } = item;
            let (acceptance, reason, unblocks, gid, reported) = match decode_group_envelope(&data) {
                Err(e) => {
                    tracing::debug!(peer = %source, error = %e, "undecodable group message");
                    (
                        MessageAcceptance::Reject,
                        "undecodable group message",
                        Unblocks::Nothing,
                        None,
                        false,
                    )
                }
                Ok(envelope) => {
                    let gid = lock(&self.topics).get(&topic).copied();
                    match gid {
                        None => (
                            MessageAcceptance::Ignore,
                            "",
                            Unblocks::Nothing,
                            None,
                            false,
                        ),
                        Some(gid) => {
                            let origin = Some((id.clone(), source));
                            let (a, r, c, reported) = self
                                .process_from(gid, envelope, Arrival::Gossip, origin)
                                .await;
                            (a, r, c, Some(gid), reported)
                        }
                    }
                }
            };
            if !reported
                && self
                    .net
                    .group_report(id, source, acceptance, reason)
                    .await
                    .is_err()
            {
                return;
            }
            if let Some(gid) = gid.filter(|_| unblocks != Unblocks::Nothing) {
                self.retry_held(gid, unblocks).await;
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // The control inbox
    // ------------------------------------------------------------------------------------

    pub(super) async fn inbox_worker(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.drain_inbox().await {
                if matches!(e, NodeError::Stopped) {
                    return;
                }
                tracing::warn!(error = %e, "processing group controls failed");
            }
            tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                _ = self.kick.notified() => {}
                _ = tokio::time::sleep(INBOX_TICK) => {}
            }
        }
    }

    pub(super) async fn drain_inbox(self: &Arc<Self>) -> Result<(), NodeError> {
        let store = self.store.clone();
        let items = blocking(move || store.inbox()).await?;
        for (key, item) in items {
            let outcome = {
                let _guard = self.lock.lock().await;
                let this = Arc::clone(self);
                blocking(move || this.inbox_blocking(key, item)).await?
            };
            if let InboxOutcome::Done {
                group,
                effects,
                invite,
                new_secret,
            } = outcome
            {
                if let Some(view) = invite {
                    self.emit(NodeEvent::GroupInvite(*view));
                }
                if let Some(gid) = group {
                    if new_secret {
                        self.kick_presence(gid);
                    }
                    // A new sender key or a changed state may open held envelopes.
                    self.act_on(gid, effects).await;
                    if !new_secret {
                        self.retry_held(gid, Unblocks::All).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Apply one control message (or keep it for later); the inbox entry is deleted in the
    /// same batch as what it changed. Call under `lock`, on a blocking thread.
    pub(super) fn inbox_blocking(
        &self,
        key: Vec<u8>,
        item: InboxItem,
    ) -> Result<InboxOutcome, NodeError> {
        let now_ms = unix_now_ms();
        let expired = now_ms.saturating_sub(item.received_at_ms) > INBOX_KEEP_MS;
        let done = |batch: Batch| -> Result<(), NodeError> {
            self.store.commit(batch, None)?;
            self.store.inbox_removed(1);
            Ok(())
        };
        let mut batch = Batch::default();
        batch.delete(key);
        let drop_it = |batch: Batch, why: &str| -> Result<InboxOutcome, NodeError> {
            tracing::debug!(sender = %item.sender.user_id(), why, "group control dropped");
            done(batch)?;
            Ok(InboxOutcome::Done {
                group: None,
                effects: Effects::default(),
                invite: None,
                new_secret: false,
            })
        };
        let control = match GroupControl::from_wire(&item.control) {
            Ok(c) => c,
            Err(_) => return drop_it(batch, "undecodable"),
        };
        let gid = control.group();
        let rec = self.store.group(&gid)?;
        let active = rec
            .as_ref()
            .filter(|r| r.membership == Membership::Active)
            .cloned();
        let keep = |batch: Batch, why: &str| -> Result<InboxOutcome, NodeError> {
            if expired {
                drop_it(batch, why)
            } else {
                Ok(InboxOutcome::Keep)
            }
        };
        match control {
            GroupControl::Invite(invite) => {
                if active.as_ref().is_some_and(|r| r.state.is_member(&self.me)) {
                    return drop_it(batch, "invite to a group we are in");
                }
                let code = invite.code();
                let verified = match invite.verify_for(&self.me, &item.sender, now_ms) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::debug!(error = %e, "refused an invite");
                        return drop_it(batch, "bad invite");
                    }
                };
                let Some(code_key) = code_bytes(&code) else {
                    return drop_it(batch, "bad invite code");
                };
                if self.store.invites()?.len() >= store::MAX_PENDING_INVITES {
                    return drop_it(batch, "too many pending invites");
                }
                batch.put(
                    store::invite_key(&code_key),
                    "pending invite",
                    &PendingInvite {
                        invite: verified.invite().to_wire().map_err(wire_err("invite"))?,
                        from: item.sender,
                        received_at_ms: item.received_at_ms,
                    },
                )?;
                done(batch)?;
                Ok(InboxOutcome::Done {
                    group: None,
                    effects: Effects::default(),
                    invite: Some(Box::new(self.invite_view(&verified, item.received_at_ms))),
                    new_secret: false,
                })
            }
            GroupControl::SenderKey(dist) => {
                let Some(rec) = active else {
                    return if rec.is_some() {
                        drop_it(batch, "sender key for a group we left")
                    } else {
                        keep(batch, "sender key for a group we have not joined")
                    };
                };
                match dist.check(&rec.state, &item.sender) {
                    Ok(()) => {}
                    Err(GroupError::FutureEpoch { .. } | GroupError::NotMember) => {
                        self.note_behind();
                        return keep(batch, "sender key from a member we do not know yet");
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "refused a sender key");
                        return drop_it(batch, "bad sender key");
                    }
                }
                if self.store.receiver_chain(&gid, &dist.key_id)?.is_none() {
                    batch.put(
                        store::receiver_key(&gid, &dist.key_id),
                        "receiver chain",
                        &ReceiverChain::from_distribution(&dist),
                    )?;
                }
                done(batch)?;
                Ok(InboxOutcome::Done {
                    group: Some(gid),
                    effects: Effects::default(),
                    invite: None,
                    new_secret: false,
                })
            }
            GroupControl::Op(op) => {
                let Some(mut rec) = active else {
                    return keep(batch, "op for a group we are not in");
                };
                match self.apply_op(&mut rec, &op) {
                    Ok(effects) => {
                        batch.put_group(&rec)?;
                        done(batch)?;
                        Ok(InboxOutcome::Done {
                            group: Some(gid),
                            effects,
                            invite: None,
                            new_secret: false,
                        })
                    }
                    Err(GroupError::Gap { .. }) => {
                        self.note_behind();
                        keep(batch, "op far ahead")
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "refused an op");
                        drop_it(batch, "bad op")
                    }
                }
            }
            GroupControl::Rekey {
                epoch,
                group_secret,
                ..
            } => {
                let Some(mut rec) = active else {
                    return keep(batch, "rekey for a group we are not in");
                };
                if rec.state.role(&item.sender) != Some(Role::Admin) {
                    return keep(batch, "rekey from someone not (yet) an admin");
                }
                let new_secret = rec.add_secret(epoch, group_secret);
                if new_secret {
                    batch.put_group(&rec)?;
                }
                done(batch)?;
                Ok(InboxOutcome::Done {
                    group: Some(gid),
                    effects: Effects::default(),
                    invite: None,
                    new_secret,
                })
            }
        }
    }
}

/// The gossipsub verdict reason for a hostile error.
fn reason_of(e: &GroupError) -> &'static str {
    match e {
        GroupError::Replay { .. } => "replayed group message",
        GroupError::Tampered => "tampered group message",
        GroupError::Forged { .. } => "forged group message",
        GroupError::TooLarge { .. } | GroupError::NotABucket { .. } => {
            "malformed group message size"
        }
        _ => "invalid group message",
    }
}

/// Sort an error of opening into blame or no blame.
fn classify(e: GroupError) -> Opened {
    if e.is_hostile() || matches!(e, GroupError::Replay { .. }) {
        Opened::Bad(e)
    } else {
        Opened::Drop(e)
    }
}
