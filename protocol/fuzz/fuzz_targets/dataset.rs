//! The dataset reader on arbitrary bytes: it must never panic, hang or read a record past
//! its limit, whatever the format it detects (JSONL, JSON array, CSV). The first byte picks
//! a small record limit, so the over-long paths are reached too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::dataset::{self, DatasetError, Limits};

fuzz_target!(|data: &[u8]| {
    let Some((&limit, content)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_record_bytes: 16 + usize::from(limit) * 64,
    };
    let Ok((_, records)) = dataset::open(std::io::Cursor::new(content.to_vec()), limits) else {
        return;
    };
    for record in records {
        match record {
            Ok(record) => {
                let conversation = record.conversation;
                assert!(conversation.text.is_some() || !conversation.messages.is_empty());
                assert!(record.line >= 1);
                let _ = conversation.training_pairs();
            }
            Err(DatasetError::Record(error)) => assert!(!error.message.is_empty()),
            Err(DatasetError::Io(_)) => break,
        }
    }
});
