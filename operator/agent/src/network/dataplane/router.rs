//! One router brought to its plan: its namespace, both legs, forwarding,
//! addresses and route, its table and DHCP, decided by
//! [`decide::router_ops`] from what its namespace holds.

use super::*;

impl<K: Kernel> Dataplane<K> {
    pub(super) async fn router_job<'a>(
        &self,
        r: &'a RouterPlan,
        hash: u64,
        fresh: bool,
        full: bool,
        host: &NsState,
    ) -> (&'a RouterPlan, u64, Result<Changes>) {
        // What the agent changes in the router is not news to its watch.
        if let Some(w) = &self.watches {
            w.begin(&r.netns);
        }
        let res = self.apply_router(r, fresh, full, host).await;
        if let Some(w) = &self.watches {
            w.end(&r.netns);
        }
        (r, hash, res)
    }

    /// Bring one router to its plan. `fresh`: this pass just made its
    /// namespace and both legs, so nothing inside it is read. `full`: read
    /// its table and forwarding even if nothing says they changed.
    async fn apply_router(
        &self,
        r: &RouterPlan,
        fresh: bool,
        full: bool,
        host: &NsState,
    ) -> Result<Changes> {
        let mut ch = Changes::default();
        let mut new = fresh;
        if !fresh {
            if self.kernel.stop_stale(&r.netns).await {
                ch.dhcp += 1;
            }
            if self.kernel.inode(&r.netns).is_none() {
                self.kernel.create(&r.netns).await?;
                ch.namespaces += 1;
                new = true;
            }
        }
        let ns = self.kernel.ns(Some(&r.netns)).await?;
        let inner = if new {
            None
        } else {
            Some(ns.observe(Want::ROUTER).await?)
        };
        let forwarding = if new {
            None
        } else if full {
            Some(self.kernel.forwarding(&r.netns).await?)
        } else {
            None
        };
        let table = if new {
            TableSeen::Absent
        } else if full {
            match self.kernel.table(Some(&r.netns), Family::Ip).await? {
                Some(l) => TableSeen::Listed(l),
                None => TableSeen::Absent,
            }
        } else {
            // Applied before, nothing changed it since: it holds the
            // ruleset of the plan applied then.
            TableSeen::Outdated
        };
        let table = match table {
            TableSeen::Outdated if self.last_ruleset_matches(r) => TableSeen::Unchanged,
            t => t,
        };
        let dhcp = self.kernel.seen(&r.netns);
        let args = r
            .dhcp
            .as_ref()
            .map(|d| self.kernel.args(&r.netns, &d.args))
            .unwrap_or_default();
        let ops = decide::router_ops(
            r,
            host,
            &RouterSeen {
                inner: inner.as_ref(),
                fresh,
                forwarding,
                table: &table,
                dhcp: &dhcp,
            },
            &args,
        );
        if !ops.pre.is_empty() {
            ns.apply(&NsOps {
                links: ops.pre.clone(),
                ..Default::default()
            })
            .await?;
        }
        if !ops.host.is_empty() {
            self.kernel
                .ns(None)
                .await?
                .apply(&NsOps {
                    links: ops.host.clone(),
                    ..Default::default()
                })
                .await?;
        }
        if ops.forwarding {
            self.kernel.set_forwarding(&r.netns).await?;
        }
        ns.apply(&ops.inner).await?;
        ch.links += ops.pre.len() + ops.host.len() + ops.inner.links.len();
        ch.addresses += ops.inner.addrs.len() + usize::from(ops.inner.route.is_some());
        // NAT and firewall, then the announcement of new external addresses.
        if let Some(t) = &ops.table {
            self.kernel.apply_table(Some(&r.netns), t).await?;
            ch.tables += 1;
        }
        if let Some(w) = &r.wan
            && !ops.announce.is_empty()
        {
            self.kernel
                .announce(&r.netns, &w.parent, r.wan_mac, ops.announce.clone())
                .await;
        }
        if let Some(d) = &ops.dhcp {
            self.kernel.apply_dhcp(&r.netns, d).await?;
            ch.dhcp += 1;
        }
        Ok(ch)
    }
}

impl<K: Kernel> Dataplane<K> {
    /// Whether the router's table was last given the planned ruleset.
    pub(super) fn last_ruleset_matches(&self, r: &RouterPlan) -> bool {
        self.applied
            .lock()
            .expect("poisoned")
            .get(&r.netns)
            .is_some_and(|m| m.ruleset.as_deref() == ruleset_hash(&r.ruleset))
    }
}
