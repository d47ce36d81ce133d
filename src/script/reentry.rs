//! Calling back into scripts from the core.
//!
//! The core calls a script-defined model's forward through the [`Model`]
//! trait, with no Rhai context in hand. The runtime marks the engine that is
//! evaluating on this thread ([`enter`]); a script closure is then called on
//! it from anywhere below that evaluation, in the call context saved when the
//! script handed the closure over (so its imports and functions resolve). A forward of a script model also
//! pushes a frame naming its hook points and the hooks of that forward, which
//! `hook()` inside the closure consults.
//!
//! Both are scoped thread-locals: set by a guard that borrows what it points
//! to, restored when the guard drops, so a pointer never outlives its target.
//!
//! [`Model`]: crate::models::Model
// rhai marks NativeCallContextStore (the `internals` feature) as volatile
// through `deprecated`; Cargo.lock pins the rhai version it was written for.
#![allow(deprecated)]
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::rc::Rc;

use rhai::{Dynamic, Engine, EvalAltResult, FnPtr, FuncArgs, NativeCallContextStore};

use crate::hooks::Hooks;

thread_local! {
    static ENGINE: Cell<*const Engine> = const { Cell::new(std::ptr::null()) };
    static FRAMES: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
}

/// While alive, script closures may be called on `engine` from this thread.
pub struct EngineGuard<'a> {
    prev: *const Engine,
    _borrow: PhantomData<&'a Engine>,
}

pub fn enter(engine: &Engine) -> EngineGuard<'_> {
    let prev = ENGINE.with(|e| e.replace(engine as *const Engine));
    EngineGuard { prev, _borrow: PhantomData }
}

impl Drop for EngineGuard<'_> {
    fn drop(&mut self) {
        ENGINE.with(|e| e.set(self.prev));
    }
}

/// Call a script closure on the engine evaluating on this thread, in the
/// context `at` saved where the closure was handed over (its script's
/// functions and imports).
pub fn call(
    f: &FnPtr,
    at: &NativeCallContextStore,
    args: impl FuncArgs,
) -> Result<Dynamic, Box<EvalAltResult>> {
    let p = ENGINE.with(|e| e.get());
    if p.is_null() {
        return Err("a script closure can only run while its script runs".into());
    }
    // SAFETY: `p` was set by `enter` from a reference whose guard is still
    // alive on this thread (guards restore the previous value on drop and
    // borrow the engine for their whole life), so it points to a live Engine.
    let engine = unsafe { &*p };
    f.call_within_context::<Dynamic>(&at.create_context(engine), args)
}

/// One forward of a script model in progress.
#[derive(Clone)]
pub struct Frame {
    pub arch: &'static str,
    pub names: Rc<[String]>,
    hooks: Option<*const (dyn Hooks + 'static)>,
}

impl Frame {
    /// The hooks of this forward, if any.
    pub fn hooks(&self) -> Option<&dyn Hooks> {
        // SAFETY: the pointer was made by `push_frame` from a reference that
        // outlives the returned guard; frames are popped when it drops, and a
        // Frame clone is only used while the forward that pushed it runs.
        self.hooks.map(|p| unsafe { &*p })
    }
}

pub struct FrameGuard<'a> {
    _borrow: PhantomData<&'a dyn Hooks>,
}

pub fn push_frame<'a>(
    arch: &'static str,
    names: Rc<[String]>,
    hooks: Option<&'a dyn Hooks>,
) -> FrameGuard<'a> {
    // SAFETY: only the lifetime is erased; the guard (bound to 'a) pops the
    // frame before the reference can dangle.
    let hooks = hooks.map(|h| unsafe {
        std::mem::transmute::<*const (dyn Hooks + 'a), *const (dyn Hooks + 'static)>(
            h as *const (dyn Hooks + 'a),
        )
    });
    FRAMES.with(|f| f.borrow_mut().push(Frame { arch, names, hooks }));
    FrameGuard { _borrow: PhantomData }
}

impl Drop for FrameGuard<'_> {
    fn drop(&mut self) {
        FRAMES.with(|f| f.borrow_mut().pop());
    }
}

/// The innermost forward of a script model running on this thread.
pub fn current_frame() -> Option<Frame> {
    FRAMES.with(|f| f.borrow().last().cloned())
}
