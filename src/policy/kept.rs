//! What a policy keeps from one version of the routes to the next, and how
//! it counts. A policy's state (a bulkhead's places, a breaker's failures, a
//! bucket's tokens) is kept by a typed key: the direction, what it guards and
//! its settings, not its name. So a limit whose source moves (from the config
//! to the contract, say) with the same settings keeps its state; only its
//! name, in refusals and as its metrics' label, follows the new version.
//! Each policy registers its own metric families, once per process.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::registry::Registry;

use crate::call::Direction;

/// A policy's metric families; `register` adds them under the `protomesh_` prefix.
pub trait Families: Default + Send + Sync + 'static {
    fn register(&self, registry: &mut Registry);
}

/// Families whose handles are labelled by the name of what they count.
pub trait NamedFamilies: Families {
    type Handles: Send + Sync + 'static;

    fn handles(&self, label: &str) -> Self::Handles;
}

/// The labels of a metric counted per method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    direction: &'static str,
    service: String,
    method: String,
}

impl MethodLabels {
    pub fn new(direction: Direction, service: &str, method: &str) -> MethodLabels {
        MethodLabels { direction: direction.as_str(), service: service.to_string(), method: method.to_string() }
    }
}

/// What a piece of kept state guards.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A method, by its path `/pkg.Service/Method`.
    Method(Arc<str>),
    /// An upstream, across its methods.
    Upstream(Arc<str>),
    /// Each caller identity, across methods.
    Callers,
}

/// What defines a piece of kept state: a new version that asks for the same
/// key gets the same state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StateKey<S> {
    pub direction: Direction,
    pub scope: Scope,
    pub settings: S,
}

impl<S: Clone> StateKey<S> {
    pub fn new(direction: Direction, scope: Scope, settings: &S) -> StateKey<S> {
        StateKey { direction, scope, settings: settings.clone() }
    }

    /// The key of a method's state.
    pub fn method(direction: Direction, path: &str, settings: &S) -> StateKey<S> {
        StateKey::new(direction, Scope::Method(path.into()), settings)
    }
}

/// State a policy keeps across versions while its key stays.
pub trait KeptState: Send + Sync + Sized + 'static {
    /// The settings that, changed, start the state anew.
    type Settings: Clone + Eq + Hash + Send + Sync + 'static;
    type Families: NamedFamilies;

    fn new(settings: &Self::Settings, label: Labelled<Self::Families>) -> Self;

    fn label(&self) -> &Labelled<Self::Families>;

    /// Called once a new version has named the state anew, so that a gauge
    /// under the new label can show what the state is.
    fn renamed(&self) {}
}

/// A name and the metric handles under it.
pub struct Label<H> {
    pub name: Arc<str>,
    pub metrics: H,
}

/// The current name of a piece of kept state, with its metric handles.
pub struct Labelled<F: NamedFamilies> {
    families: Arc<F>,
    current: ArcSwap<Label<F::Handles>>,
}

impl<F: NamedFamilies> Labelled<F> {
    /// Named `name` in messages and metrics.
    pub fn new(families: Arc<F>, name: Arc<str>) -> Labelled<F> {
        let metrics = families.handles(&name);
        Labelled { families, current: ArcSwap::from_pointee(Label { name, metrics }) }
    }

    /// Named `name` in messages, counted under `label` with others.
    pub fn counted_as(families: Arc<F>, name: Arc<str>, label: &str) -> Labelled<F> {
        let metrics = families.handles(label);
        Labelled { families, current: ArcSwap::from_pointee(Label { name, metrics }) }
    }

    pub fn get(&self) -> Guard<Arc<Label<F::Handles>>> {
        self.current.load()
    }

    pub fn families(&self) -> &Arc<F> {
        &self.families
    }

    /// Names it `name` from now on; whether that is a change.
    pub fn rename(&self, name: Arc<str>) -> bool {
        if *self.current.load().name == *name {
            return false;
        }
        let metrics = self.families.handles(&name);
        self.current.store(Arc::new(Label { name, metrics }));
        true
    }
}

impl<F: NamedFamilies> fmt::Debug for Labelled<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.current.load().name)
    }
}
