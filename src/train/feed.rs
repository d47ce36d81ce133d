//! Data sources for the training loop: image loaders (epochs, the test
//! split for evaluation) and token files (endless random windows, fixed
//! validation windows).
use std::cell::RefCell;
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tch::{Device, Tensor};

use super::Data;
use crate::data::{Loader, LoaderState, Rng, TextSplit, TokenDataset, TokenState};

/// An image loader for training and, optionally, one for evaluation.
pub struct ImageFeed {
    pub train: Rc<RefCell<Loader>>,
    pub eval: Option<Rc<RefCell<Loader>>>,
}

impl Data for ImageFeed {
    fn next_batch(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        Ok(self.train.borrow_mut().next_batch()?.map(|b| (b.x, b.y)))
    }

    fn new_epoch(&mut self) -> Result<()> {
        // The loader starts the next epoch (reshuffled) after reporting the end.
        Ok(())
    }

    fn batches_per_epoch(&self) -> Option<i64> {
        Some(self.train.borrow().len() as i64)
    }

    fn for_each_eval(&mut self, f: &mut dyn FnMut(&Tensor, &Tensor) -> Result<()>) -> Result<()> {
        let Some(eval) = &self.eval else { return Ok(()) };
        let mut l = eval.borrow_mut();
        // Always the whole split, from its start.
        l.reset();
        while let Some(b) = l.next_batch()? {
            f(&b.x, &b.y)?;
        }
        Ok(())
    }

    fn state(&self) -> Value {
        json!(self.train.borrow().state())
    }

    fn restore(&mut self, state: &Value) -> Result<()> {
        let s: LoaderState = serde_json::from_value(state.clone()).context("checkpoint: loader state")?;
        self.train.borrow_mut().restore(&s)
    }

    fn rewind(&mut self) {
        self.train.borrow_mut().reset();
    }

    fn describe(&self) -> Value {
        let t = self.train.borrow();
        json!({
            "train": t.name(),
            "batch_size": t.options().batch_size,
            "batches_per_epoch": t.len(),
            "eval": self.eval.as_ref().map(|e| e.borrow().name().to_string()),
        })
    }
}

/// Random windows of a token data set; evaluation uses the same
/// `eval_batches` validation windows every time (a fixed seed).
pub struct TextFeed {
    pub data: Rc<RefCell<TokenDataset>>,
    pub batch_size: usize,
    pub block_size: usize,
    pub eval_batches: usize,
    pub eval_seed: u64,
}

impl TextFeed {
    pub fn new(
        data: Rc<RefCell<TokenDataset>>,
        batch_size: usize,
        block_size: usize,
        eval_batches: usize,
    ) -> Result<Self> {
        if batch_size == 0 || block_size == 0 {
            bail!("batch_size and block_size must be at least 1");
        }
        Ok(TextFeed { data, batch_size, block_size, eval_batches, eval_seed: 0x5eed })
    }
}

impl Data for TextFeed {
    fn next_batch(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        let b =
            self.data.borrow_mut().batch(TextSplit::Train, self.batch_size, self.block_size, Device::Cpu)?;
        Ok(Some((b.x, b.y)))
    }

    fn new_epoch(&mut self) -> Result<()> {
        Ok(())
    }

    fn batches_per_epoch(&self) -> Option<i64> {
        None
    }

    fn for_each_eval(&mut self, f: &mut dyn FnMut(&Tensor, &Tensor) -> Result<()>) -> Result<()> {
        let d = self.data.borrow();
        let mut rng = Rng::new(self.eval_seed);
        for _ in 0..self.eval_batches {
            let b = d.val.sample(self.batch_size, self.block_size, &mut rng)?;
            f(&b.x, &b.y)?;
        }
        Ok(())
    }

    fn state(&self) -> Value {
        json!(self.data.borrow().state())
    }

    fn restore(&mut self, state: &Value) -> Result<()> {
        let s: TokenState = serde_json::from_value(state.clone()).context("checkpoint: token data state")?;
        self.data.borrow_mut().restore(&s);
        Ok(())
    }

    fn rewind(&mut self) {
        self.data.borrow_mut().rewind();
    }

    fn describe(&self) -> Value {
        let d = self.data.borrow();
        json!({
            "dir": d.dir.display().to_string(),
            "train_tokens": d.train.len(),
            "val_tokens": d.val.len(),
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "eval_batches": self.eval_batches,
        })
    }
}
