//! Hook points: named places in a model's forward where an activation can
//! be read or replaced (TransformerLens's names and shapes,
//! `docs/mechint.md`). Models visit them; `mechint` builds on them.
//!
//! A forward without hooks never formats a name or copies a tensor; one
//! with hooks asks [`Hooks::wants`] before doing extra work (an explicit
//! attention pattern, an explicit layer norm) for a point.
use std::cell::RefCell;

use tch::{TchError, Tensor};

/// Something that watches or edits activations at hook points.
pub trait Hooks {
    /// Does this point need to be visited? Cheap; called once per point.
    fn wants(&self, name: &str) -> bool;
    /// The activation at `name`; returns a replacement, or `None` to keep it.
    fn call(&self, name: &str, act: &Tensor) -> Result<Option<Tensor>, TchError>;
}

/// Does any hook want `name`?
pub fn wants(hooks: Option<&dyn Hooks>, name: impl FnOnce() -> String) -> bool {
    hooks.is_some_and(|h| h.wants(&name()))
}

/// Several hook sets applied in order: each sees the previous one's output.
pub struct Chain<'a>(pub Vec<&'a dyn Hooks>);

impl Hooks for Chain<'_> {
    fn wants(&self, name: &str) -> bool {
        self.0.iter().any(|h| h.wants(name))
    }

    fn call(&self, name: &str, act: &Tensor) -> Result<Option<Tensor>, TchError> {
        let mut cur: Option<Tensor> = None;
        for h in &self.0 {
            if h.wants(name) {
                let a = cur.as_ref().unwrap_or(act);
                if let Some(t) = h.call(name, a)? {
                    cur = Some(t);
                }
            }
        }
        Ok(cur)
    }
}

/// Hooks from Rust closures, each on one exact name.
#[derive(Default)]
pub struct FnHooks<'a> {
    #[allow(clippy::type_complexity)]
    fns: Vec<(String, Box<dyn Fn(&str, &Tensor) -> Result<Option<Tensor>, TchError> + 'a>)>,
}

impl<'a> FnHooks<'a> {
    pub fn new() -> Self {
        FnHooks { fns: Vec::new() }
    }

    /// Add a hook on `name`; hooks on one name run in the order added.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        f: impl Fn(&str, &Tensor) -> Result<Option<Tensor>, TchError> + 'a,
    ) -> &mut Self {
        self.fns.push((name.into(), Box::new(f)));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.fns.is_empty()
    }
}

impl Hooks for FnHooks<'_> {
    fn wants(&self, name: &str) -> bool {
        self.fns.iter().any(|(n, _)| n == name)
    }

    fn call(&self, name: &str, act: &Tensor) -> Result<Option<Tensor>, TchError> {
        let mut cur: Option<Tensor> = None;
        for (n, f) in &self.fns {
            if n == name {
                if let Some(t) = f(name, cur.as_ref().unwrap_or(act))? {
                    cur = Some(t);
                }
            }
        }
        Ok(cur)
    }
}

/// Records the activations of the points `filter` accepts (detached, on
/// `device` when given), in forward order.
pub struct Recorder<'a> {
    filter: Box<dyn Fn(&str) -> bool + 'a>,
    device: Option<tch::Device>,
    /// Keep the autograd graph (attribution patching needs gradients).
    keep_graph: bool,
    pub acts: RefCell<Vec<(String, Tensor)>>,
}

impl<'a> Recorder<'a> {
    pub fn new(filter: impl Fn(&str) -> bool + 'a, device: Option<tch::Device>) -> Self {
        Recorder { filter: Box::new(filter), device, keep_graph: false, acts: RefCell::new(Vec::new()) }
    }

    /// Record without detaching.
    pub fn with_graph(mut self) -> Self {
        self.keep_graph = true;
        self
    }

    pub fn take(&self) -> Vec<(String, Tensor)> {
        std::mem::take(&mut *self.acts.borrow_mut())
    }
}

impl Hooks for Recorder<'_> {
    fn wants(&self, name: &str) -> bool {
        (self.filter)(name)
    }

    fn call(&self, name: &str, act: &Tensor) -> Result<Option<Tensor>, TchError> {
        let mut t = if self.keep_graph { act.shallow_clone() } else { act.f_detach()? };
        if let Some(d) = self.device {
            t = t.f_to_device(d)?;
        }
        self.acts.borrow_mut().push((name.to_string(), t));
        Ok(None)
    }
}
